"""One typed dataclass tree for every setting of qvlm.

Defaults live only here. A YAML file holds deltas, ``a.b=c`` overrides come last:
defaults < YAML < overrides. Unknown keys and wrong types raise ``ConfigError`` naming the
key. The resolved tree dumps to YAML and reads back identically (``dump_config``/``load_config``).

The nesting follows the model (as HF ``Blip2Config`` nests vision / qformer / text configs):
``model.vision``, ``model.qformer``, ``model.projector``, ``model.llm`` (+ ``model.llm.lora``),
then ``data``, ``train`` and ``eval``.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LORA_POSITIONS = ("all", "image", "from_image")  # model.llm.lora.positions
IMAGE_POSITIONS = ("user_turn", "prefix")  # model.llm.image_position
# Keys that older versions wrote into run folders and saved models (CPU speed options that were
# removed): a config that still has them loads, with a warning naming them.
REMOVED_KEYS = ("model.qformer.image_pos_embed", "data.pad_to_multiple_of", "train.itc_one_pass",
                "train.itm_reuse_image_kv", "train.fused_qkv", "train.share_prompt_prefix")


class ConfigError(ValueError):
    """A bad key or value in a config file or override; the message names the key."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------

# Defaults are the article's recipe (hub ids, for users online); configs/tiny.yaml and
# configs/demo.yaml switch to random and packaged sources that work offline.


@dataclass
class VisionConfig:
    """The frozen image backbone (any HF vision tower: ViT, SigLIP/CLIP vision, DINOv2)."""

    source: str = "google/vit-base-patch16-224-in21k"
    # "last" or "penultimate" hidden state, or "last_unnormed": the last block's output before the
    # tower's final LayerNorm, whose place the Q-Former's image LayerNorm takes (BLIP-2, LAVIS)
    layer: str = "last"
    drop_cls: bool = False  # drop the leading [CLS] token from the sequence
    grey_view: bool = False  # also encode a grey copy of each image: a token holds both views (width 2x)


@dataclass
class QFormerConfig:
    """The Q-Former, initialised from a BERT-family checkpoint (cross-attention is new)."""

    source: str = "bert-base-uncased"
    tokenizer: str = ""  # "" = same as source
    num_queries: int = 32
    cross_attention_every: int = 2  # layers 0, k, 2k, ... get cross-attention (as BLIP-2)
    max_text_len: int = 32
    embed_dim: int = 256  # shared ITC space
    dropout: float = 0.1
    # Init of the new cross-attention's query and key weights: 0 = BERT's (normal, std
    # initializer_range = 0.02), which starts every query on a near-uniform average of the image
    # tokens; g > 0 = normal with std g / sqrt(fan_in), attention logits of order g**2 at the start.
    cross_attention_qk_gain: float = 0.0
    # False: the Q-Former has no trained text side (imported from a BLIP-2 checkpoint without one,
    # e.g. Blip2ForConditionalGeneration): stage 2 only; scoring, retrieval and stage 1 refuse it.
    has_text: bool = True


@dataclass
class ProjectorConfig:
    """MLP from the Q-Former width to the LLM width."""

    depth: int = 2  # number of Linear layers (1 = a single linear map)
    hidden_dim: int = 0  # 0 = the LLM width
    activation: str = "gelu"  # gelu | relu | silu | tanh


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Where the adapters act: "all" tokens; only the "image" tokens (Partial LoRA, as in
    # InternLM-XComposer2); or "from_image": the image tokens and every token after them. With
    # "image" and "from_image" a text-only input gives exactly the base model's output. Neither can
    # be merged into the weights (qvlm export).
    positions: str = "all"


@dataclass
class LLMConfig:
    """The causal language model: frozen base + LoRA adapters."""

    source: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer: str = ""  # "" = same as source
    use_lora: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    system_prompts: list[str] = field(
        default_factory=lambda: ["You are a helpful assistant that can see images."]
    )
    user_prompts: list[str] = field(
        default_factory=lambda: ["Describe the image.", "What is in this picture?"]
    )
    image_placeholder: str = "<image>"
    # Where the image tokens go: "user_turn" (at the placeholder inside the chat template's user turn)
    # or "prefix" (first, before everything: BLIP-2's layout, as transformers and vLLM build it)
    image_position: str = "user_turn"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    trust_remote_code: bool = False  # only when the user asks for it


@dataclass
class DataConfig:
    source: str = "synth"  # synth[:key=value,...] | file.jsonl | file.csv | HF dataset | shards
    image_size: int = 0  # 0 = the vision tower's own size
    max_caption_tokens: int = 64
    max_image_pixels: int = 64_000_000  # decompression-bomb guard
    min_image_side: int = 1  # skip images smaller than this on either side
    max_caption_chars: int = 2048  # longer captions are cut at a word boundary (tokens: max_text_len)
    image_column: str = ""  # HF datasets / files: "" = auto-detect (image, img, jpg, ...)
    caption_column: str = ""  # "" = auto-detect (caption, text, txt, ...)
    shuffle_shards: bool = True  # streamed tar shards: shuffle shard order per epoch
    num_workers: int = 0
    cache_dir: str = ""  # frozen-feature cache; "" = off
    group_by_length: bool = False
    augment: bool = False
    # Stage 2, records with both a caption and question-answer pairs: the share of samples that
    # train on the caption (the rest on one of the pairs).
    caption_prob: float = 0.5
    # Stage 2 text replay (train.losses.replay > 0): instructions whose base-model answers are
    # replayed, one per line; "" = the packaged list (qvlm/train/replay_prompts.txt).
    replay_prompts: str = ""


@dataclass
class TrainConfig:
    stage: int = 1
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    losses: dict[str, float] = field(default_factory=lambda: {"itc": 1.0, "itm": 1.0, "itg": 1.0})
    # ITM on the first ceil(f * B) pairs of each (per-process) batch and their two hard negatives:
    # the ITM pass is about half a stage-1 step, so 0.5 buys more steps in a fixed time
    itm_fraction: float = 1.0
    # Stage 2 with train.losses.replay > 0: text-only samples per step whose targets are the base
    # LLM's own answers (qvlm.train.replay), so the adapters leave plain chat as it was
    replay_batch_size: int = 2
    replay_loss: str = "kl"  # kl: match the base's next-token distributions | ce: its answer tokens
    lr: float = 1e-4
    lr_qformer: float = 0.0  # 0 = lr
    lr_projector: float = 0.0  # 0 = lr
    lr_lora: float = 0.0  # 0 = lr
    weight_decay: float = 0.05
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    clip_grad: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp32
    save_every: int = 0  # 0 = only at the end
    eval_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    init_from: str = ""  # stage 2: a stage-1 model folder
    freeze_qformer: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each Q-Former and LLM layer (first steps pay the compilation)
    dist_timeout_s: int = 600  # multi-process: a collective that waits longer than this fails the job
    tensorboard: bool = False  # also write OUT/tensorboard/ event files (needs the tensorboard package)


@dataclass
class EvalConfig:
    data: str = ""
    batch_size: int = 32
    max_samples: int = 200
    itm_rerank_k: int = 16
    max_new_tokens: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading, overriding, dumping
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (deltas only), then ``a.b=c`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_path(tree, key, value)
    return config_from_dict(tree)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot read value {raw!r}: {exc}") from exc
    return key, value


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section, cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a plain mapping, checking every key and type."""
    where = prefix or "<root>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known under {where}: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce(hints[name], value, key)
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints and numeric strings widen to floats."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return {coerce(key_tp, k, key): coerce(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    return coerce_scalar(tp, value, key)


def coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - the tree only uses the types above
        raise ConfigError(f"{key}: unsupported type {tp}")
    raise ConfigError(f"{key} must be {tp.__name__}, got {type(value).__name__} {value!r}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; each names its key."""
    checks = [
        (cfg.model.vision.layer in ("last", "penultimate", "last_unnormed"), "model.vision.layer",
         "last, penultimate or last_unnormed"),
        (cfg.model.qformer.num_queries >= 1, "model.qformer.num_queries", ">= 1"),
        (cfg.model.qformer.cross_attention_every >= 1, "model.qformer.cross_attention_every", ">= 1"),
        (cfg.model.qformer.max_text_len >= 2, "model.qformer.max_text_len", ">= 2"),
        (cfg.model.qformer.cross_attention_qk_gain >= 0, "model.qformer.cross_attention_qk_gain", ">= 0"),
        (cfg.model.projector.depth >= 1, "model.projector.depth", ">= 1"),
        (cfg.model.projector.activation in ("gelu", "relu", "silu", "tanh"), "model.projector.activation",
         "one of gelu, relu, silu, tanh"),
        (cfg.model.llm.lora.r >= 1, "model.llm.lora.r", ">= 1"),
        (0.0 <= cfg.model.llm.lora.dropout < 1.0, "model.llm.lora.dropout", "in [0, 1)"),
        (cfg.model.llm.lora.positions in LORA_POSITIONS, "model.llm.lora.positions", ", ".join(LORA_POSITIONS)),
        (cfg.model.llm.image_position in IMAGE_POSITIONS, "model.llm.image_position", ", ".join(IMAGE_POSITIONS)),
        (cfg.model.llm.lora.positions == "all" or cfg.train.losses.get("replay", 0) == 0, "train.losses",
         f"without replay when model.llm.lora.positions={cfg.model.llm.lora.positions} (text-only replay never "
         "reaches adapters limited to the image and what follows it)"),
        (len(cfg.model.llm.user_prompts) >= 1, "model.llm.user_prompts", "a non-empty list"),
        (cfg.train.stage in (1, 2), "train.stage", "1 or 2"),
        (cfg.train.max_steps >= 0, "train.max_steps", ">= 0"),
        (cfg.train.batch_size >= 1, "train.batch_size", ">= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", ">= 1"),
        (set(cfg.train.losses) <= {"itc", "itm", "itg", "lm", "replay"}, "train.losses",
         "keys among itc, itm, itg, lm, replay"),
        (cfg.train.replay_batch_size >= 1, "train.replay_batch_size", ">= 1"),
        (cfg.train.replay_loss in ("kl", "ce"), "train.replay_loss", "kl or ce"),
        (0.0 < cfg.train.itm_fraction <= 1.0, "train.itm_fraction", "in (0, 1]"),
        (all(w >= 0 for w in cfg.train.losses.values()), "train.losses", "non-negative weights"),
        (cfg.train.precision in ("auto", "bf16", "fp32"), "train.precision", "auto, bf16 or fp32"),
        (cfg.train.dist_timeout_s > 0, "train.dist_timeout_s", "> 0"),
        (cfg.train.lr > 0, "train.lr", "> 0"),
        (cfg.data.max_caption_tokens >= 1, "data.max_caption_tokens", ">= 1"),
        (cfg.data.num_workers >= 0, "data.num_workers", ">= 0"),
        (0.0 <= cfg.data.caption_prob <= 1.0, "data.caption_prob", "in [0, 1]"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {get_path(cfg, key)!r}")


def get_path(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` on it gives an equal ``Config``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg), encoding="utf-8")


def drop_removed_keys(tree: dict[str, Any]) -> list[str]:
    """Delete the ``REMOVED_KEYS`` from a config mapping in place, warning once; returns those found."""
    found = []
    for dotted in REMOVED_KEYS:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            found.append(f"{dotted}={node.pop(leaf)!r}")
    if found:
        warnings.warn(f"ignoring config keys that qvlm no longer has: {', '.join(found)}", stacklevel=3)
    return found


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a ``Config`` from a plain mapping (removed keys dropped with a warning)."""
    drop_removed_keys(data)
    cfg = build(Config, data, "")
    validate(cfg)
    return cfg
