"""``qvlm export``: a standalone copy of a saved model, optionally with the LoRA merged into the LLM;
or (``--format transformers``) a ``Blip2ForConditionalGeneration`` folder for transformers and vLLM.

With ``--merge-lora`` the adapters are folded into the base weights (W + BA·alpha/r) and the LLM is
written in HF format (safetensors) inside the export under ``base/llm``; the exported config points
at it with ``use_lora: false``, so the export loads with no peft adapters and no GGUF de-quantising.

The transformers export maps every block onto BLIP-2's: the tower onto ``Blip2VisionModel`` (an HF
ViT's weights, or an imported BLIP-2 tower; the Q-Former's image LayerNorm becomes its
``post_layernorm``), the Q-Former onto ``Blip2QFormerModel``, the depth-1 projector onto
``language_projection``, and the LLM (LoRA merged, an ``<image>`` token added) onto
``language_model``. A model that does not map is refused with every reason at once.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from qvlm.config import ConfigError
from qvlm.models.qformer import BLIP2_CONFIG_FIELDS
from qvlm.models.vision import PIL_CODES, fit_blip2_attention_biases
from qvlm.models.vlm import VLM
from qvlm.prompt import end_of_turn_ids

IMAGE_TOKEN = "<image>"


def export_model(model_dir: str | Path, out: str | Path, merge_lora: bool = False, fmt: str = "qvlm") -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    if fmt == "transformers":
        return export_transformers(model_dir, out)
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


# ---- transformers' Blip2ForConditionalGeneration ---------------------------------------------


def transformers_problems(vlm: VLM) -> list[str]:
    """Every part of the model that ``Blip2ForConditionalGeneration`` cannot express."""
    m, tower = vlm.config.model, vlm.vision.tower.config.model_type
    checks = [
        (vlm.llm is not None, "no LLM: a stage-1 model (export a stage-2 model)"),
        (tower in ("vit", "blip_2_vision_model"),
         f"model.vision.source: a {tower} tower (Blip2VisionModel holds an HF ViT or BLIP-2's own tower)"),
        (m.vision.layer == "last_unnormed", f"model.vision.layer={m.vision.layer} (BLIP-2 reads last_unnormed: "
                                            "the tower's final LayerNorm is the Q-Former's image LayerNorm)"),
        (not m.vision.grey_view, "model.vision.grey_view=true (BLIP-2 reads one view of each image)"),
        (not m.vision.drop_cls, "model.vision.drop_cls=true (BLIP-2 reads every token, CLS included)"),
        (not vlm.vision.processor.crop, "the tower's image processor centre-crops (BLIP-2's resizes)"),
        (m.projector.depth == 1, f"model.projector.depth={m.projector.depth} (language_projection is one Linear)"),
        (not (vlm.llm is not None and vlm.llm.has_lora and vlm.llm.lora_limited),
         f"model.llm.lora.positions={m.llm.lora.positions} (only LoRA on all positions merges into the weights)"),
        (m.llm.image_position == "prefix", f"model.llm.image_position={m.llm.image_position} (transformers "
                                           "and vLLM put the image tokens first: prefix)"),
    ]
    return [why for ok, why in checks if not ok]


@torch.no_grad()
def export_transformers(model_dir: str | Path, out: Path) -> dict:
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    vlm = VLM.from_pretrained(model_dir, with_llm=True).eval()
    problems = transformers_problems(vlm)
    if problems:
        raise ConfigError(f"{model_dir} cannot be exported to transformers' Blip2ForConditionalGeneration: "
                          + "; ".join(problems))
    tokenizer, lm = llm_with_image_token(vlm)
    vision_config, tower = blip2_tower(vlm.vision.tower)
    q = vlm.qformer
    config = Blip2Config(vision_config=vision_config.to_dict(), qformer_config=qformer_fields(vlm),
                         text_config=lm.config.to_dict(), num_query_tokens=q.num_queries,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    hf = Blip2ForConditionalGeneration(config).eval()
    tower = fit_blip2_attention_biases(tower, set(hf.vision_model.state_dict()))
    state = {f"vision_model.{k}": v for k, v in tower.items()}
    state.update({theirs: q.get_parameter(ours) for ours, theirs in q.blip2_weight_map(text=False).items()})
    state.update({f"language_projection.{k}": v for k, v in vlm.projector.net[0].state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in lm.state_dict().items()})
    hf.load_state_dict(state, strict=True)
    hf.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.generation_config.suppress_tokens = [config.image_token_index]
    partial = out.with_name(out.name + ".partial")  # written whole, then moved: no half-written export
    shutil.rmtree(partial, ignore_errors=True)
    try:
        hf.save_pretrained(partial)
        processor(vlm, tokenizer).save_pretrained(partial)
        (partial / "README.md").write_text(model_card(vlm, out), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)  # empty (export_model checked)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"out": str(out), "format": "transformers", "image_token_index": config.image_token_index,
            "num_query_tokens": q.num_queries, "files": sorted(p.name for p in out.iterdir())}


def llm_with_image_token(vlm: VLM):
    """(tokenizer with ``<image>`` added, the LLM with LoRA merged and room for that token)."""
    from tokenizers import AddedToken

    tokenizer = copy.deepcopy(vlm.llm.tokenizer)  # the loaded one is shared (cached per source)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    lm = vlm.llm.model.merge_and_unload() if vlm.llm.has_lora else vlm.llm.model
    old = lm.get_input_embeddings().num_embeddings
    if old < len(tokenizer):  # a zero row: never read (image tokens are replaced), suppressed in generation
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        lm.get_input_embeddings().weight[old:] = 0
        lm.get_output_embeddings().weight[old:] = 0
    return tokenizer, lm


def blip2_tower(tower) -> tuple:
    """(``Blip2VisionConfig``, ``Blip2VisionModel`` state) of an HF ViT or a BLIP-2 tower."""
    from transformers import Blip2VisionConfig

    c, sd = tower.config, tower.state_dict()
    if c.model_type == "blip_2_vision_model":
        return c, {k: v for k, v in sd.items() if not k.startswith("post_layernorm.")}
    config = Blip2VisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                               image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.hidden_act,
                               layer_norm_eps=c.layer_norm_eps, qkv_bias=True)
    state = {"embeddings.class_embedding": sd["embeddings.cls_token"],
             "embeddings.position_embedding": sd["embeddings.position_embeddings"],
             "embeddings.patch_embedding.weight": sd["embeddings.patch_embeddings.projection.weight"],
             "embeddings.patch_embedding.bias": sd["embeddings.patch_embeddings.projection.bias"]}
    for i in range(c.num_hidden_layers):
        vit, ours = f"layers.{i}.", f"encoder.layers.{i}."
        att = {p: sd[f"{vit}attention.{p}_proj.weight"] for p in "qkv"}
        bias = [sd.get(f"{vit}attention.{p}_proj.bias", torch.zeros(c.hidden_size)) for p in "qkv"]
        state.update({f"{ours}self_attn.qkv.weight": torch.cat([att["q"], att["k"], att["v"]]),
                      f"{ours}self_attn.qkv.bias": torch.cat(bias)})
        for theirs, mine in (("self_attn.projection", "attention.o_proj"), ("layer_norm1", "layernorm_before"),
                             ("layer_norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                state[f"{ours}{theirs}.{p}"] = sd[f"{vit}{mine}.{p}"]
    return config, state


def qformer_fields(vlm: VLM) -> dict:
    b = vlm.qformer.bert_config
    return {k: getattr(b, k) for k in BLIP2_CONFIG_FIELDS} | {
        "cross_attention_frequency": vlm.config.model.qformer.cross_attention_every,
        "encoder_hidden_size": vlm.vision.width, "use_qformer_text_input": False}


def processor(vlm: VLM, tokenizer):
    """transformers' ``Blip2Processor`` with the tower's pixels: size, mean, std and resampling."""
    from transformers import Blip2Processor, BlipImageProcessor

    p = vlm.vision.processor
    resample = {name: code for code, name in PIL_CODES.items()}[p.resample]
    images = BlipImageProcessor(size={"height": p.size, "width": p.size}, resample=resample,
                                image_mean=list(p.mean), image_std=list(p.std), do_convert_rgb=True)
    return Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=vlm.qformer.num_queries)


def model_card(vlm: VLM, out: Path) -> str:
    """The exported folder's README.md, from the template ``model_card.md`` beside this module."""
    m = vlm.config.model
    template = (Path(__file__).parent / "model_card.md").read_text(encoding="utf-8")
    return template.format(name=out.name, vision=m.vision.source, qformer=m.qformer.source, llm=m.llm.source,
                           queries=vlm.qformer.num_queries)
