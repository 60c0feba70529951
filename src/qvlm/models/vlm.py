"""VLM: vision tower -> Q-Former -> projector -> LLM, composed (BLIP-2 Fig. 3, the article's diagram).

Stage 1 uses ``image_embeds`` + the Q-Former (heads live with the losses); stage 2 places the
projected query outputs at the image positions of the LLM's input and trains Q-Former, projector
and LoRA. Freezing is explicit: the vision tower and the LLM base never receive gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qvlm.config import Config, ConfigError, load_config, save_config
from qvlm.models.llm import LanguageModel
from qvlm.models.projector import Projector
from qvlm.models.qformer import QFormer
from qvlm.models.saved import bundle_sources, localize_sources
from qvlm.models.stage1 import Stage1Heads
from qvlm.models.vision import VisionEncoder
from qvlm.model_sources import UnreadableFile, read_safetensors

BLOCK_FILES = ("qformer", "heads", "projector", "lora")  # one safetensors file each in a saved model


class MissingTextSide(ConfigError):
    """A task that needs the Q-Former's text side, on a model imported without one (a usage error)."""


def check_text_side(cfg: Config, task: str) -> None:
    if not cfg.model.qformer.has_text:
        raise MissingTextSide(
            f"{task} needs the Q-Former's text side (text embeddings and feed-forward), which this model "
            "lacks: it was imported from a BLIP-2 checkpoint without one (Blip2Model or "
            "Blip2ForConditionalGeneration), so it serves stage 2 only. For scores, retrieval or stage 1, "
            "import a Blip2ForImageTextRetrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g).")


def read_model_config(path: str | Path) -> Config:
    """The config of a saved model folder, its bundled sources made absolute."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise UnreadableFile(f"{path / 'config.yaml'}: missing ({path} is not a saved qvlm model folder)")
    try:
        return localize_sources(load_config(path / "config.yaml"), path)
    except ConfigError as exc:  # a saved config that does not parse: a damaged folder
        raise UnreadableFile(f"{path / 'config.yaml'}: {exc}") from exc


@dataclass
class VLMOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None
    image_tokens: Tensor  # (B, Q, Dlm)


class VLM(nn.Module):
    def __init__(self, config: Config, vision: VisionEncoder, qformer: QFormer,
                 projector: Projector | None = None, llm: LanguageModel | None = None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.qformer = qformer
        self.projector = projector
        self.llm = llm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.train.seed + 2)
            self.heads = Stage1Heads(qformer, embed_dim=config.model.qformer.embed_dim)

    @classmethod
    def from_config(cls, cfg: Config, with_llm: bool | None = None, seed: int | None = None) -> "VLM":
        """Build every block from its source. Stage 1 needs no LLM unless ``with_llm`` says so."""
        seed = cfg.train.seed if seed is None else seed
        with_llm = cfg.train.stage == 2 if with_llm is None else with_llm
        trust = cfg.model.trust_remote_code
        m = cfg.model
        vision = VisionEncoder.from_source(m.vision.source, layer=m.vision.layer, drop_cls=m.vision.drop_cls,
                                           seed=seed, trust_remote_code=trust, grey_view=m.vision.grey_view)
        qformer = QFormer.from_source(
            m.qformer.source, vision_width=vision.width, num_queries=m.qformer.num_queries,
            cross_attention_every=m.qformer.cross_attention_every, dropout=m.qformer.dropout,
            seed=seed, trust_remote_code=trust,
            cross_attention_qk_gain=m.qformer.cross_attention_qk_gain,
            vision_norm_eps=vision.norm_eps or 1e-5,
        )
        projector = llm = None
        if with_llm:
            llm = LanguageModel.from_config(m.llm, seed=seed, trust_remote_code=trust)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                projector = Projector(qformer.hidden_size, llm.hidden_size, depth=m.projector.depth,
                                      hidden_dim=m.projector.hidden_dim, activation=m.projector.activation)
        model = cls(cfg, vision, qformer, projector, llm)
        model.set_trainable(2 if with_llm else 1, freeze_qformer=cfg.train.freeze_qformer)
        return model

    def require_text(self, task: str) -> None:
        """Raise ``MissingTextSide`` when ``task`` needs the Q-Former's text side and this model has none."""
        check_text_side(self.config, task)

    # ---- the image path ------------------------------------------------------------------

    def image_features(self, pixel_values: Tensor) -> Tensor:
        return self.vision(pixel_values)  # (B, 3, H, W) -> (B, N, Dv), no grad

    def batch_image_embeds(self, batch: dict) -> Tensor:
        """A batch's frozen features: cached ones when it has them, else the tower run on its pixels."""
        if "image_embeds" in batch:
            return batch["image_embeds"].float()  # (B, N, Dv), fp16 in the cache
        if not len(batch["pixel_values"]):  # a batch of text-only conversations
            return batch["pixel_values"].new_zeros(0, self.vision.num_tokens, self.vision.width)
        return self.image_features(batch["pixel_values"])  # (B, N, Dv)

    def image_tokens(self, image_embeds: Tensor) -> Tensor:
        """Frozen features -> Q-Former queries -> projector: (B, N, Dv) -> (B, Q, Dlm)."""
        if self.projector is None:
            raise RuntimeError("this VLM was built without an LLM/projector (stage 1); build it with with_llm=True")
        query = self.qformer(image_embeds=image_embeds).query  # (B, Q, Dq)
        return self.projector(query)  # (B, Q, Dlm)

    # ---- stage 2 -------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_mask: Tensor,
                pixel_values: Tensor | None = None, image_embeds: Tensor | None = None,
                labels: Tensor | None = None) -> VLMOutput:
        """LLM forward with the image tokens placed where ``image_mask`` (B, T) is True.

        Each row of ``image_mask`` marks Q positions (the collator reserves them), or none in a
        text-only row; the image inputs are those of the rows with an image, in order.
        """
        embeds, tokens = self.input_embeds(input_ids, image_mask, pixel_values, image_embeds)
        with self.llm.lora_positions(image_mask):  # position-limited adapters: from the image slots
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        return VLMOutput(logits=out.logits, loss=out.loss, image_tokens=tokens)

    def input_embeds(self, input_ids: Tensor, image_mask: Tensor, pixel_values: Tensor | None = None,
                     image_embeds: Tensor | None = None,
                     image_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(LLM input embeddings (B, T, Dlm) with the image tokens in place, image tokens (B, Q, Dlm));
        ``image_positions``: see ``merge``."""
        if self.llm is None:
            raise RuntimeError("this VLM was built without an LLM (stage 1); build it with with_llm=True")
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or image_embeds")
            image_embeds = self.image_features(pixel_values)
        if image_embeds.shape[0]:
            tokens = self.image_tokens(image_embeds)  # (B', Q, Dlm): the rows with an image
        else:  # text-only rows only
            tokens = self.llm.embed(input_ids[:0, :1]).expand(0, self.qformer.num_queries, -1)
        return self.merge(self.llm.embed(input_ids), tokens, image_mask, image_positions), tokens

    @staticmethod
    def merge(text_embeds: Tensor, image_tokens: Tensor, image_mask: Tensor,
              positions: Tensor | None = None) -> Tensor:
        """Scatter (B', Q, D) image tokens into the (B, T, D) text embeddings at ``image_mask``: the
        B' rows with an image, in order (a text-only row marks no position).
        ``positions``: ``image_mask.nonzero().T`` (2, B*Q), found and checked beforehand (the stage-2
        collator does, on the CPU): then the scatter is by index and nothing waits for the device."""
        b, q, _ = image_tokens.shape
        if positions is None:  # found here, on the device
            counts = image_mask.sum(dim=1)
            if not torch.all((counts == q) | (counts == 0)) or int((counts == q).sum()) != b:
                raise ValueError(f"image_mask must mark {q} positions in each of {b} rows with an image (none in "
                                 f"a text-only row), got {counts.tolist()}")
            positions = image_mask.nonzero().T  # (2, B*Q)
        elif positions.shape != (2, b * q):
            raise ValueError(f"image_positions must be (2, {b * q}) for {b} rows of {q} image tokens, got "
                             f"{tuple(positions.shape)}")
        out = text_embeds.clone()
        out[positions[0], positions[1]] = image_tokens.reshape(b * q, -1).to(out.dtype)  # row-major order
        return out

    # ---- parameters ----------------------------------------------------------------------

    def block_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter a training stage may touch, by block (the tied LM-head embedding once)."""
        blocks: dict[str, list[tuple[str, nn.Parameter]]] = {
            "qformer": list(self.qformer.named_parameters()),
            "heads": [(n, p) for n, p in self.heads.named_parameters() if not n.startswith("lm_head.word_embeddings")],
            "projector": list(self.projector.named_parameters()) if self.projector is not None else [],
            "lora": list(self.llm.lora_parameters()) if self.llm is not None else [],
        }
        return blocks

    def set_trainable(self, stage: int, freeze_qformer: bool = False) -> None:
        """Stage 1: Q-Former + heads. Stage 2: Q-Former (unless frozen) + projector + LoRA.
        The vision tower and the LLM base are never trainable."""
        wanted = {"qformer", "heads"} if stage == 1 else {"qformer", "projector", "lora"}
        if stage == 2 and freeze_qformer:
            wanted.discard("qformer")
        for block, named in self.block_parameters().items():
            for _, p in named:
                p.requires_grad_(block in wanted)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by group (qformer, queries, heads, projector, lora)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for block, named in self.block_parameters().items():
            for name, p in named:
                if not p.requires_grad:
                    continue
                group = "queries" if block == "qformer" and name == "query_tokens" else block
                groups.setdefault(group, []).append((name, p))
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts per trainable group and the frozen rest, for the start-of-run summary."""
        counts = {name: sum(p.numel() for _, p in params) for name, params in self.parameter_groups().items()}
        trainable = sum(counts.values())
        total = sum(p.numel() for p in self.parameters())
        counts["trainable"] = trainable
        counts["frozen"] = total - trainable
        return counts

    # ---- state ---------------------------------------------------------------------------

    def trainable_state(self, blocks: tuple[str, ...] = BLOCK_FILES) -> dict[str, Tensor]:
        """``block.name -> tensor`` for the learnable blocks (what checkpoints and saved models hold)."""
        return {f"{block}.{name}": p.detach() for block, named in self.block_parameters().items()
                if block in blocks for name, p in named}

    def load_trainable_state(self, state: dict[str, Tensor], strict: bool = True) -> list[str]:
        """Copy tensors saved by ``trainable_state`` in place; returns the names not found in ``state``."""
        own = {f"{block}.{name}": p for block, named in self.block_parameters().items() for name, p in named}
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ValueError(f"saved tensors do not belong to this model: {unexpected[:5]}")
        missing = []
        with torch.no_grad():
            for name, param in own.items():
                if name not in state:
                    missing.append(name)
                    continue
                if state[name].shape != param.shape:
                    raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != model {tuple(param.shape)}")
                param.copy_(state[name])
        if strict and missing:
            raise ValueError(f"saved model lacks {len(missing)} tensors, e.g. {missing[:5]}")
        return missing

    def save_pretrained(self, path: str | Path) -> Path:
        """One folder: config.yaml + a safetensors file per learnable block (no pickle), and the
        base models that live in local folders (``base/``), so the folder can move."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_config(bundle_sources(self.config, path), path / "config.yaml")
        state = self.trainable_state()
        for block in BLOCK_FILES:
            part = {k: v.contiguous().cpu() for k, v in state.items() if k.startswith(block + ".")}
            if part:
                save_file(part, path / f"{block}.safetensors")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, with_llm: bool | None = None) -> "VLM":
        """Rebuild from ``config.yaml`` (base models from their sources) and load the saved blocks."""
        path = Path(path)
        cfg = read_model_config(path)
        has_llm = (path / "projector.safetensors").is_file()
        model = cls.from_config(cfg, with_llm=has_llm if with_llm is None else with_llm)
        saved = ("qformer", "heads", "projector", "lora") if has_llm and cfg.model.llm.use_lora else (
            ("qformer", "heads", "projector") if has_llm else ("qformer", "heads"))
        blocks = BLOCK_FILES if model.llm is not None else ("qformer", "heads")
        must = tuple(b for b in blocks if b in saved)  # what the folder must hold: no silent random block
        state = read_blocks(path, must, required=True)
        state.update(read_blocks(path, tuple(b for b in blocks if b not in must)))
        model.load_trainable_state(state, strict=False)
        return model


def read_blocks(path: Path, blocks: tuple[str, ...], required: bool = False) -> dict[str, Tensor]:
    """The tensors of the named blocks of a saved model folder (``block.safetensors`` files);
    with ``required`` a missing file is an error, else it is skipped."""
    state: dict[str, Tensor] = {}
    for block in blocks:
        file = path / f"{block}.safetensors"
        if file.is_file():
            state.update(read_safetensors(file))
        elif required:
            raise UnreadableFile(f"{file}: missing (expected in a saved qvlm model folder)")
    return state
