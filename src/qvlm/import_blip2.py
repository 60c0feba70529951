"""``qvlm import blip2``: a qvlm stage-1 model folder from a transformers BLIP-2 checkpoint.

The source is a hub id or a local folder holding ``Blip2ForImageTextRetrieval``, ``Blip2Model`` or
``Blip2ForConditionalGeneration`` weights. Only safetensors are read (never a pickle), and of them
only the vision tower, the Q-Former and the stage-1 heads (an LLM's tensors are never loaded).

- The frozen tower is the checkpoint's ``Blip2VisionModel`` (``OUT/base/vision``, with the
  checkpoint's image processor). The Q-Former reads its last block before ``post_layernorm``
  (``model.vision.layer: last_unnormed``), and that norm becomes the Q-Former's image LayerNorm
  (LAVIS's ``ln_vision``): the Q-Former reads exactly what it read in BLIP-2.
- The Q-Former takes every tensor the checkpoint has: query tokens, layers, and (retrieval
  checkpoints) the text embeddings, text feed-forward, ITC projections and ITM head, with the
  checkpoint's tokenizer. The ITC temperature starts at qvlm's default and the ITG head fresh:
  no transformers BLIP-2 checkpoint holds it.
- Without the text side (``Blip2Model``, ``Blip2ForConditionalGeneration``) the model is for
  stage 2 only (``model.qformer.has_text: false``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qvlm import model_sources as sources
from qvlm.config import Config, validate
from qvlm.models.qformer import BLIP2_CONFIG_FIELDS
from qvlm.models.vision import fit_blip2_attention_biases
from qvlm.models.vlm import VLM

KEEP = ("vision_model.", "qformer.", "query_tokens", "embeddings.", "vision_projection.", "text_projection.",
        "itm_head.")  # what is read from the checkpoint; the LLM's tensors stay on disk
HEADS = {"vision_proj": "vision_projection", "text_proj": "text_projection", "itm_head": "itm_head"}
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")
HUB_FILES = ["*.json", "*.txt", "*.model"]  # configs, tokenizer and image processor


def import_blip2(source: str, out: str | Path, overwrite: bool = False) -> dict:
    """Write the stage-1 model folder ``out``; returns what was imported and what starts fresh."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
    folder = checkpoint_folder(source)
    config = read_config(folder)
    tensors = read_tensors(folder)
    has_text = "embeddings.word_embeddings.weight" in tensors
    has_heads = all(f"{hf}.weight" in tensors for hf in HEADS.values())
    partial = out.with_name(out.name + ".partial")  # written whole, then moved: no half-written model
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_tower(folder, config, tensors, partial / "base" / "vision")
        if has_text:
            write_tokenizer(folder, config, partial / "base" / "qformer-tokenizer")
        model = VLM.from_config(imported_config(config, partial, has_text), with_llm=False)
        model.load_trainable_state(imported_state(model, tensors, has_text, has_heads), strict=False)
        model.save_pretrained(partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    fresh = ["heads.lm_head (ITG head: absent from transformers' BLIP-2 checkpoints)",
             f"heads.temp (ITC temperature: qvlm's default {model.heads.temp.item():.2f})"]
    if not has_heads:
        fresh.insert(0, "heads.vision_proj, heads.text_proj, heads.itm_head (ITC and ITM heads)")
    return {"out": str(out), "architecture": (config.architectures or ["?"])[0], "has_text": has_text,
            "stage": "1 and 2" if has_text else "2 only", "num_queries": config.num_query_tokens,
            "vision": f"Blip2VisionModel, {config.vision_config.num_hidden_layers} layers, "
                      f"{config.vision_config.image_size}px", "fresh": fresh}


# ---- reading the checkpoint ------------------------------------------------------------------


def checkpoint_folder(source: str) -> Path:
    """A local folder as it is; a hub id: the configs, tokenizer and the shards that hold the tower
    and Q-Former, from the hub or its cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or sources.looks_like_path(source):
        raise sources.SourceError(f"{source}: not a folder holding a transformers BLIP-2 checkpoint")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, allow_patterns=HUB_FILES))
        index = folder / "model.safetensors.index.json"
        shards = sorted({f for k, f in json.loads(index.read_text())["weight_map"].items() if k.startswith(KEEP)}) \
            if index.is_file() else ["*.safetensors"]
        return Path(snapshot_download(source, allow_patterns=HUB_FILES + shards))
    except Exception as exc:  # offline, no such repo, no network: one message with the way out
        raise sources.SourceError(
            f"{source}: not a local folder, and the hub (or its cache) could not provide it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Download it once with "
            "internet, or give a local folder.") from exc


def read_config(folder: Path):
    from transformers import Blip2Config

    file = folder / "config.json"
    if not file.is_file():
        raise sources.SourceError(f"{folder}: no config.json (not a transformers checkpoint)")
    try:
        model_type = json.loads(file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise sources.UnreadableFile(f"{file}: unreadable ({exc})") from exc
    if model_type != "blip-2":
        raise sources.SourceError(f"{folder}: model_type {model_type!r}, not a BLIP-2 checkpoint ('blip-2')")
    return Blip2Config.from_pretrained(folder)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tower, Q-Former and head tensors of every safetensors file in ``folder``; a folder with
    only pickled weights is refused (they are never unpickled)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pattern in PICKLES for p in folder.glob(pattern))
        if pickled:
            raise sources.SourceError(
                f"{folder}: only pickled weights ({', '.join(pickled[:3])}), which qvlm never opens (unpickling "
                "runs code). Convert them once, in an environment you trust: `python -c \"from transformers "
                f"import AutoModel; AutoModel.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\"`,"
                " then import that folder.")
        raise sources.SourceError(f"{folder}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(KEEP)})
        except Exception as exc:  # a bad header or a cut-short file
            raise sources.UnreadableFile(f"{file}: not a readable safetensors file ({exc})") from exc
    if not any(k.startswith("vision_model.") for k in tensors) or "query_tokens" not in tensors:
        raise sources.SourceError(f"{folder}: the safetensors hold no BLIP-2 vision tower and query tokens")
    return tensors


# ---- writing the model folder ----------------------------------------------------------------


def write_tower(folder: Path, config, tensors: dict[str, torch.Tensor], dest: Path) -> None:
    """``Blip2VisionModel`` in HF format with the checkpoint's image processor."""
    from safetensors.torch import save_file
    from transformers import Blip2VisionModel

    dest.mkdir(parents=True)
    config.vision_config.save_pretrained(dest)
    with torch.device("meta"):  # the names the installed transformers expects, no memory
        expected = set(Blip2VisionModel(config.vision_config).state_dict())
    tower = fit_blip2_attention_biases({k.removeprefix("vision_model."): v for k, v in tensors.items()
                                        if k.startswith("vision_model.")}, expected)
    save_file({k: v.contiguous() for k, v in tower.items()}, dest / "model.safetensors")
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        shutil.copy(processor, dest / "preprocessor_config.json")


def write_tokenizer(folder: Path, config, dest: Path) -> None:
    """The checkpoint's (BERT) tokenizer, with a BERT config.json so the folder is a model source."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise sources.SourceError(f"{folder}: no Q-Former tokenizer could be read ({exc})") from exc
    tokenizer.save_pretrained(dest)
    (dest / "config.json").write_text(json.dumps({"model_type": "bert", **bert_fields(config.qformer_config)},
                                                 indent=2), encoding="utf-8")


def bert_fields(q) -> dict:
    """The BERT config fields of a ``Blip2QFormerConfig``: the Q-Former's shape."""
    return {k: getattr(q, k) for k in BLIP2_CONFIG_FIELDS} | {"type_vocab_size": 1}


def imported_config(config, folder: Path, has_text: bool) -> Config:
    cfg = Config()
    q = config.qformer_config
    shape = "&".join(f"{k}={yaml_number(v)}" for k, v in bert_fields(q).items())
    cfg.model.vision.source, cfg.model.vision.layer = str(folder / "base" / "vision"), "last_unnormed"
    m = cfg.model.qformer
    m.source, m.has_text = f"random:bert?{shape}", has_text
    m.tokenizer = str(folder / "base" / "qformer-tokenizer") if has_text else ""
    m.num_queries, m.cross_attention_every = config.num_query_tokens, q.cross_attention_frequency
    m.embed_dim, m.dropout = config.image_text_hidden_size, q.hidden_dropout_prob
    m.max_text_len = min(m.max_text_len, q.max_position_embeddings)
    validate(cfg)
    return cfg


def yaml_number(value) -> str:
    """A value as the ``random:`` source's YAML reads it back: ``1e-12`` would read as a string."""
    text = repr(value) if isinstance(value, float) else str(value)
    return text.replace("e", ".0e") if isinstance(value, float) and "e" in text and "." not in text else text


def imported_state(model: VLM, tensors: dict[str, torch.Tensor], has_text: bool,
                   has_heads: bool) -> dict[str, torch.Tensor]:
    """``block.name -> tensor`` for ``VLM.load_trainable_state``, from the checkpoint's names."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise sources.SourceError(f"the checkpoint has no {name!r}, which a {model.qformer.num_queries}-query "
                                      f"{len(model.qformer.layers)}-layer BLIP-2 Q-Former needs")
        return tensors[name]

    state = {f"qformer.{ours}": take(theirs) for ours, theirs in model.qformer.blip2_weight_map(has_text).items()}
    if has_text:  # BLIP-2's text embeddings have no token types: a zero type embedding adds nothing
        state["qformer.embeddings.token_type_embeddings.weight"] = torch.zeros_like(
            model.qformer.embeddings.token_type_embeddings.weight)
    if has_heads:
        state.update({f"heads.{ours}.{p}": take(f"{hf}.{p}") for ours, hf in HEADS.items() for p in ("weight", "bias")})
    return state
