"""``qvlm export``: a standalone copy of a saved model, optionally with the LoRA merged into the LLM.

With ``--merge-lora`` the adapters are folded into the base weights (W + BA·alpha/r) and the LLM is
written in HF format (safetensors) inside the export under ``base/llm``; the exported config points
at it with ``use_lora: false``, so the export loads with no peft adapters and no GGUF de-quantising.
"""

from __future__ import annotations

from pathlib import Path

from qvlm.models.vlm import VLM


def export_model(model_dir: str | Path, out: str | Path, merge_lora: bool = False) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    vlm = VLM.from_pretrained(model_dir)
    if merge_lora:
        if vlm.llm is None or not vlm.llm.has_lora:
            raise ValueError(f"{model_dir} has no LoRA adapters to merge (a stage-1 model, or use_lora false)")
        if vlm.llm.lora_limited:
            raise ValueError(f"{model_dir} has LoRA on some positions only (model.llm.lora.positions: "
                             f"{vlm.llm.lora_scope}), so it cannot be folded into the weights; export without "
                             "--merge-lora")
        merged = vlm.llm.model.merge_and_unload()
        llm_dir = out / "base" / "llm"
        merged.save_pretrained(llm_dir, safe_serialization=True)
        vlm.llm.tokenizer.save_pretrained(llm_dir)
        vlm.llm.model = merged
        vlm.config.model.llm.source = str(llm_dir)
        vlm.config.model.llm.tokenizer = ""
        vlm.config.model.llm.use_lora = False
    vlm.save_pretrained(out)
    return {"out": str(out), "merged_lora": merge_lora,
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())}
