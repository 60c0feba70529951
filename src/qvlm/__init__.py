"""qvlm: turn a text-only causal LM into a vision-language model the BLIP-2 way.

frozen vision backbone -> Q-Former (learnable queries, cross-attention) -> MLP projector -> LLM + LoRA.
Nothing heavy is imported here: ``import qvlm`` is cheap; import the blocks from ``qvlm.models``.
"""

__version__ = "0.1.0"
