"""Model FLOPs of a stage-2 training step, counted analytically, and model FLOPs utilisation (MFU).

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


def matmul_params(module: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Weights of the Linear and Conv layers in ``module`` whose qualified name contains none of ``skip``."""
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(s in name for s in skip))


def qformer_groups(qformer, images: int, image_tokens: int, trained: bool = True) -> list[MatmulGroup]:
    """The Q-Former's query path over ``images`` images: the query rows through self-attention, the
    query FFN and cross-attention's query/output; the image tokens through cross-attention's
    keys/values (no input gradient: the image features are frozen)."""
    crosses = [layer.cross_attn for layer in qformer.layers if layer.cross_attn is not None]
    kv = sum(a.key.weight.numel() + a.value.weight.numel() for a in crosses)
    query = matmul_params(qformer.layers, skip=("text_ffn", "cross_attn.key", "cross_attn.value"))
    return [MatmulGroup("Q-Former query path", query, images * qformer.num_queries, trained, trained),
            MatmulGroup("Q-Former image K/V", kv, images * image_tokens, trained, False)]


def stage2_groups(model, batch: int, tokens: int, supervised: int, image_tokens: int) -> list[MatmulGroup]:
    """Stage 2: the Q-Former's query path and the projector (trained unless frozen), the LLM over
    the batch's ``tokens`` real (not padding) positions (frozen base, trained LoRA, gradients flow
    through to the image tokens), the LM head only at the ``supervised`` positions (as
    ``stage2_losses`` does). Padding positions are computed but are not model FLOPs. A step's model
    FLOPs: the sum of the groups' ``flops``."""
    qf, base = model.qformer, model.llm.base_model()
    qf_trained = any(p.requires_grad for p in qf.parameters())
    head = base.get_output_embeddings()
    return qformer_groups(qf, batch, image_tokens, trained=qf_trained) + [
        MatmulGroup("projector", matmul_params(model.projector), batch * qf.num_queries, True, qf_trained),
        MatmulGroup("LLM base (frozen)", matmul_params(base, skip=("lora_",)) - head.weight.numel(), tokens,
                    False, True),
        MatmulGroup("LoRA", matmul_params(base) - matmul_params(base, skip=("lora_",)), tokens, True, True),
        MatmulGroup("LM head (frozen)", head.weight.numel(), supervised, False, True),
    ]
