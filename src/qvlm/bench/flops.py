"""Model FLOPs of a training step, counted analytically, and model FLOPs utilisation (MFU).

A step's matmuls are listed as groups: weights of P parameters multiplying ``tokens`` rows each.
The forward costs 2·P·tokens; the backward adds 2·P·tokens for the gradient with respect to the
input (when the gradient has to flow further back) and 2·P·tokens for the weight gradient (when
the weight is trained). So a trained block costs 6·P·tokens (the usual 6·N·D), a frozen block the
gradient passes through (the LLM base in stage 2) 4·P·tokens, and a frozen block run forward only
(the vision tower when recomputed) 2·P·tokens. P counts the weights of Linear and Conv layers and an
output embedding where it is used as the LM head; embedding lookups, norms, biases and the
attention score/value products (T² terms, a few percent at these lengths) are left out.
Gradient-checkpointing recomputation is not model FLOPs and is not counted.

MFU = model FLOPs per step / step seconds / the card's peak dense bf16 FLOP/s (``PEAK_BF16``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per card, from the vendors' data sheets.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (HBM3) and other H100 names
    ("A100", 312e12),
)


@dataclass(frozen=True)
class MatmulGroup:
    name: str
    params: int  # weights multiplied
    tokens: int  # rows each weight multiplies per step
    trained: bool  # weight gradient computed
    input_grad: bool  # gradient with respect to the input computed

    @property
    def flops(self) -> int:
        return 2 * self.params * self.tokens * (1 + int(self.input_grad) + int(self.trained))


def step_flops(groups: Iterable[MatmulGroup]) -> int:
    return sum(g.flops for g in groups)


def peak_bf16_flops(device_name: str) -> float | None:
    """The card's peak dense bf16 FLOP/s from ``PEAK_BF16`` (first name contained), else None."""
    for name, peak in PEAK_BF16:
        if name.lower() in device_name.lower():
            return peak
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float | None) -> float | None:
    if not peak_flops or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak_flops


def matmul_params(*modules: nn.Module | None, skip: tuple[str, ...] = ()) -> int:
    """Weights of the Linear and Conv layers in ``modules`` whose qualified name contains none of ``skip``."""
    total = 0
    for module in modules:
        if module is None:
            continue
        for name, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(s in name for s in skip):
                total += m.weight.numel()
    return total


# ---- the Q-Former's parts ----------------------------------------------------------------------

@dataclass(frozen=True)
class QFormerParams:
    self_attn: int  # q, k, v, dense of every layer: queries and text
    query_ffn: int
    text_ffn: int
    cross_q_o: int  # cross-attention query and output: queries only
    cross_kv: int  # cross-attention key and value: image tokens

    @classmethod
    def of(cls, qformer) -> QFormerParams:
        layers = list(qformer.layers)
        crosses = [layer.cross_attn for layer in layers if layer.cross_attn is not None]
        return cls(
            self_attn=sum(matmul_params(layer.self_attn) for layer in layers),
            query_ffn=sum(matmul_params(layer.query_ffn) for layer in layers),
            text_ffn=sum(matmul_params(layer.text_ffn) for layer in layers),
            cross_q_o=sum(a.query.weight.numel() + a.dense.weight.numel() for a in crosses),
            cross_kv=sum(a.key.weight.numel() + a.value.weight.numel() for a in crosses),
        )


def qformer_groups(p: QFormerParams, prefix: str, images: int, queries: int, texts: int, text_len: int,
                   image_tokens: int, encode_images: int, trained: bool = True) -> list[MatmulGroup]:
    """One Q-Former pass: ``images`` x ``queries`` query rows, ``texts`` x ``text_len`` text rows,
    ``encode_images`` x ``image_tokens`` rows through the image keys/values (no input gradient:
    the image features are frozen)."""
    q_rows, t_rows = images * queries, texts * text_len
    groups = [
        MatmulGroup(f"{prefix} self-attention", p.self_attn, q_rows + t_rows, trained, trained),
        MatmulGroup(f"{prefix} query FFN + cross q/o", p.query_ffn + p.cross_q_o, q_rows, trained, trained),
        MatmulGroup(f"{prefix} text FFN", p.text_ffn, t_rows, trained, trained),
        MatmulGroup(f"{prefix} image K/V", p.cross_kv, encode_images * image_tokens, trained, False),
    ]
    return [g for g in groups if g.tokens and g.params]


def stage1_groups(model, batch: int, text_len: int, image_tokens: int, losses: dict[str, float],
                  vision_tokens: int = 0) -> list[MatmulGroup]:
    """Stage 1 as ``qvlm.models.stage1`` runs it: one unimodal pass (queries + text), ITM over 3B
    pairs reusing the images' keys/values, ITG over the text with the queries cached; plus the frozen
    tower's forward over ``vision_tokens`` per image when features are recomputed from pixels."""
    p, qf, heads = QFormerParams.of(model.qformer), model.qformer, model.heads
    use = {k for k, w in losses.items() if w > 0}
    text = bool(use & {"itc", "itm"})
    q = qf.num_queries
    groups = qformer_groups(p, "ITC pass", batch, q, batch if text else 0, text_len, image_tokens, batch)
    if "itc" in use or "itm" in use:
        groups.append(MatmulGroup("ITC projections", matmul_params(heads.vision_proj) * q
                                  + matmul_params(heads.text_proj), batch, True, True))
    if "itm" in use:
        groups += qformer_groups(p, "ITM pass", 3 * batch, q, 3 * batch, text_len, image_tokens, 0)
        groups.append(MatmulGroup("ITM head", matmul_params(heads.itm_head), 3 * batch * q, True, True))
    if "itg" in use:
        groups += qformer_groups(p, "ITG pass", 0, q, batch, text_len, image_tokens, 0)
        lm = heads.lm_head.dense.weight.numel() + heads.lm_head.word_embeddings.weight.numel()
        groups.append(MatmulGroup("ITG LM head", lm, batch * text_len, True, True))
    if vision_tokens:
        groups.append(MatmulGroup("vision tower (frozen)", matmul_params(model.vision), batch * vision_tokens,
                                  False, False))
    return groups


def stage2_groups(model, batch: int, tokens: int, supervised: int, image_tokens: int) -> list[MatmulGroup]:
    """Stage 2: the Q-Former's query path and the projector (trained unless frozen), the LLM over
    the batch's ``tokens`` real (not padding) positions (frozen base, trained LoRA, gradients flow
    through to the image tokens), the LM head only at the ``supervised`` positions (as
    ``stage2_losses`` does). Padding positions are computed but are not model FLOPs."""
    qf, llm = model.qformer, model.llm
    qf_trained = any(p.requires_grad for p in qf.parameters())
    base = llm.base_model()
    head = base.get_output_embeddings()
    rows = tokens
    groups = qformer_groups(QFormerParams.of(qf), "Q-Former", batch, qf.num_queries, 0, 0, image_tokens, batch,
                            trained=qf_trained)
    groups += [
        MatmulGroup("projector", matmul_params(model.projector), batch * qf.num_queries, True, qf_trained),
        MatmulGroup("LLM base (frozen)", matmul_params(base, skip=("lora_",)) - head.weight.numel(), rows,
                    False, True),
        MatmulGroup("LoRA", matmul_params(base) - matmul_params(base, skip=("lora_",)), rows, True, True),
        MatmulGroup("LM head (frozen)", head.weight.numel(), supervised, False, True),
    ]
    return [g for g in groups if g.tokens and g.params]
