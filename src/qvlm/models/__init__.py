"""The model blocks, one file each: vision, qformer, projector, llm, and their composition vlm."""
