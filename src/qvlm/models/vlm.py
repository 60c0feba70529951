"""VLM: vision tower -> Q-Former -> projector -> LLM, composed (BLIP-2 Fig. 3, the article's diagram).

Stage 1 uses ``image_embeds`` + the Q-Former (heads live with the losses); stage 2 places the
projected query outputs at the image positions of the LLM's input and trains Q-Former, projector
and LoRA. Freezing is explicit: the vision tower and the LLM base never receive gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qvlm.config import Config
from qvlm.models.llm import LanguageModel
from qvlm.models.projector import Projector
from qvlm.models.qformer import QFormer
from qvlm.models.vision import VisionEncoder


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

    @classmethod
    def from_config(cls, cfg: Config, with_llm: bool | None = None, seed: int | None = None) -> "VLM":
        """Build every block from its source. Stage 1 needs no LLM unless ``with_llm`` says so."""
        seed = cfg.train.seed if seed is None else seed
        with_llm = cfg.train.stage == 2 if with_llm is None else with_llm
        trust = cfg.model.trust_remote_code
        m = cfg.model
        vision = VisionEncoder.from_source(m.vision.source, layer=m.vision.layer,
                                           drop_cls=m.vision.drop_cls, seed=seed, trust_remote_code=trust)
        qformer = QFormer.from_source(
            m.qformer.source, vision_width=vision.width, num_queries=m.qformer.num_queries,
            cross_attention_every=m.qformer.cross_attention_every, dropout=m.qformer.dropout,
            seed=seed, trust_remote_code=trust,
        )
        projector = llm = None
        if with_llm:
            llm = LanguageModel.from_config(m.llm, seed=seed, trust_remote_code=trust)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                projector = Projector(qformer.hidden_size, llm.hidden_size, depth=m.projector.depth,
                                      hidden_dim=m.projector.hidden_dim, activation=m.projector.activation)
        return cls(cfg, vision, qformer, projector, llm)

    # ---- the image path ------------------------------------------------------------------

    def image_features(self, pixel_values: Tensor) -> Tensor:
        return self.vision(pixel_values)  # (B, 3, H, W) -> (B, N, Dv), no grad

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

        Each row of ``image_mask`` must mark exactly Q positions (the collator reserves them).
        """
        if self.llm is None:
            raise RuntimeError("this VLM was built without an LLM (stage 1); build it with with_llm=True")
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or image_embeds")
            image_embeds = self.image_features(pixel_values)
        tokens = self.image_tokens(image_embeds)  # (B, Q, Dlm)
        embeds = self.merge(self.llm.embed(input_ids), tokens, image_mask)  # (B, T, Dlm)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        return VLMOutput(logits=out.logits, loss=out.loss, image_tokens=tokens)

    @staticmethod
    def merge(text_embeds: Tensor, image_tokens: Tensor, image_mask: Tensor) -> Tensor:
        """Scatter (B, Q, D) image tokens into the (B, T, D) text embeddings at ``image_mask``."""
        b, q, _ = image_tokens.shape
        counts = image_mask.sum(dim=1)
        if not torch.all(counts == q):
            raise ValueError(f"image_mask must mark exactly {q} positions per row, got {counts.tolist()}")
        out = text_embeds.clone()
        out[image_mask] = image_tokens.reshape(b * q, -1).to(out.dtype)  # row-major matches mask order
        return out

    # ---- parameters ----------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by group: qformer, projector, lora (and nothing else)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"qformer": [], "projector": [], "lora": []}
        groups["qformer"] = [(n, p) for n, p in self.qformer.named_parameters() if p.requires_grad]
        if self.projector is not None:
            groups["projector"] = [(n, p) for n, p in self.projector.named_parameters() if p.requires_grad]
        if self.llm is not None:
            groups["lora"] = [(n, p) for n, p in self.llm.lora_parameters() if p.requires_grad]
        return groups

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts per group, trainable and frozen, for the start-of-run summary."""
        counts = {name: sum(p.numel() for _, p in params) for name, params in self.parameter_groups().items()}
        trainable = sum(counts.values())
        total = sum(p.numel() for p in self.parameters())
        counts["trainable"] = trainable
        counts["frozen"] = total - trainable
        return counts
