"""LanguageModel: a Hugging Face causal LM with a frozen base and trainable LoRA adapters.

The language side of BLIP-2 (paper §3.3), with the article's change: instead of a frozen LLM,
low-rank adapters (LoRA, Hu et al. 2021, via ``peft``) learn to read the projected image tokens
while the base weights stay frozen. Any HF causal LM loads: a hub id, a local folder, or a GGUF
file (de-quantised by transformers; the tokenizer and chat template come from the file).

With ``lora.positions = "image"`` (Partial LoRA, InternLM-XComposer2) the adapters' output is kept
only at the image tokens: a forward hook on every ``lora_B`` multiplies it by the mask given with
``lora_positions(image_mask)``; a forward without a mask (text only, or a decoding step after the
prompt) runs the base weights alone. ``lora.positions = "from_image"`` keeps it at the image tokens
and every token after them (the answer about the image too); text before the image, and text-only
conversations, still run the base weights alone.

This block takes token ids and embeddings, never raw text: prompts are built in ``qvlm.prompt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from qvlm import model_sources as sources
from qvlm.config import LLMConfig, LoraConfig


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None = None
    past_key_values: Any = None


class LanguageModel(nn.Module):
    def __init__(self, model: nn.Module, tokenizer: Any, source: str = ""):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.model.requires_grad_(False)
        self.lora_scope = "all"  # lora.positions: "all", "image" or "from_image"; see lora_positions
        self._lora_mask: Tensor | None = None  # (B, T) bool while inside lora_positions(mask)
        self._compiled: dict[bool, Any] = {}  # CUDA graphs or not -> compiled ``self.model`` (compiled_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_config(cls, cfg: LLMConfig, seed: int = 0, trust_remote_code: bool = False) -> "LanguageModel":
        from transformers import AutoModelForCausalLM

        tokenizer = sources.load_tokenizer(cfg.tokenizer or cfg.source, trust_remote_code)
        src = sources.resolve(cfg.source)
        if src.kind == "random":  # a random LM must share the tokenizer's vocabulary and ids
            defaults = {
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
            src = dataclasses.replace(src, options={**defaults, **src.options})
        model = sources.load_model(src, AutoModelForCausalLM, seed=seed, trust_remote_code=trust_remote_code)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise sources.SourceError(
                f"model.llm.tokenizer {cfg.tokenizer or cfg.source!r} has {len(tokenizer)} tokens but "
                f"model.llm.source {cfg.source!r} embeds only {model.get_input_embeddings().num_embeddings}"
            )
        lm = cls(model, tokenizer, source=cfg.source)
        if cfg.use_lora:
            lm.add_lora(cfg.lora, seed=seed)
        return lm

    def add_lora(self, lora: LoraConfig, seed: int = 0) -> None:
        """Wrap the model with peft LoRA adapters; only the adapters are trainable."""
        import torch
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, _ in self.model.named_modules()}
        missing = [m for m in lora.target_modules if m not in names]
        if missing:
            raise ValueError(
                f"model.llm.lora.target_modules {missing} not found in {type(self.model).__name__} "
                f"(its Linear names include: {sorted(n for n in names if 'proj' in n)[:12]})"
            )
        peft_cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM", bias="none",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = get_peft_model(self.model, peft_cfg)
        self.lora_scope = lora.positions
        if self.lora_limited:
            for name, module in self.model.named_modules():
                if name.rsplit(".", 2)[-2:-1] == ["lora_B"]:  # ...lora_B.<adapter>: the adapter's output
                    module.register_forward_hook(self._keep_adapter_positions)

    @property
    def lora_limited(self) -> bool:
        """The adapters act on some positions only (lora.positions "image" or "from_image")."""
        return self.lora_scope != "all"

    def adapter_mask(self, image_mask: Tensor | None) -> Tensor | None:
        """(B, T) bool: where the adapters act, given the image slots. "from_image": each row from
        its first image slot on (a suffix of a row stays a suffix, so applying this twice is a no-op)."""
        if image_mask is None or self.lora_scope != "from_image":
            return image_mask
        return image_mask.long().cummax(dim=1).values.bool()

    def adapter_mask_next(self, mask: Tensor) -> Tensor:
        """(R, 1) bool: whether the adapters act on a token appended after ``mask`` (R, T)."""
        if self.lora_scope == "from_image":
            return mask.any(dim=1, keepdim=True)  # after the image: an adapted answer
        return mask.new_zeros(len(mask), 1)  # image-only: generated tokens never

    @contextlib.contextmanager
    def lora_positions(self, image_mask: Tensor | None) -> Iterator[None]:
        """The forwards inside apply position-limited adapters where ``adapter_mask(image_mask)``
        (B, T) is True and nowhere else; ``None`` = nowhere. A no-op for adapters on every position."""
        previous, self._lora_mask = self._lora_mask, self.adapter_mask(image_mask)
        try:
            yield
        finally:
            self._lora_mask = previous

    def checkpoint_contexts(self) -> tuple[Any, Any]:
        """``context_fn`` for activation checkpointing: the recomputation in the backward sees the
        adapter mask its forward saw."""
        return contextlib.nullcontext(), self.lora_positions(self._lora_mask)

    def _keep_adapter_positions(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        mask = self._lora_mask
        if mask is None:
            return output * 0  # no image here: base weights only (the zero keeps the graph uniform)
        if mask.shape != output.shape[:2]:
            raise RuntimeError(f"LoRA position mask {tuple(mask.shape)} does not match the LLM input "
                               f"{tuple(output.shape[:2])}")
        return output * mask.unsqueeze(-1).to(output.dtype)  # (B, T, Dout)

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (B, T) -> (B, T, Dlm)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False) -> LMOutput:
        kwargs = {"past_key_values": past_key_values} if past_key_values is not None else {}
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                         use_cache=use_cache, **kwargs)
        return LMOutput(logits=out.logits, loss=out.loss, past_key_values=getattr(out, "past_key_values", None))

    def compiled_model(self, cuda_graphs: bool | None = None) -> Any:
        """``torch.compile(self.model)`` for decoding steps (``GenerationConfig.compile``), made once per
        setting and kept outside the module tree (so it adds nothing to ``state_dict``). It reads the
        same parameters, so trained adapters need no recompiling. ``cuda_graphs`` (None: on a GPU)
        replays each step as a CUDA graph, as ``mode="reduce-overhead"`` does. Inductor rounds to the
        low precision wherever eager PyTorch would (``emulate_precision_casts``): under bf16 autocast
        it would otherwise keep some intermediates in fp32, and a near-tie could then pick another
        token than the eager decoder."""
        if cuda_graphs is None:
            cuda_graphs = self.model.get_input_embeddings().weight.device.type == "cuda"
        if cuda_graphs not in self._compiled:
            options = {"emulate_precision_casts": True, "triton.cudagraphs": cuda_graphs}
            self._compiled[cuda_graphs] = torch.compile(self.model, options=options)
        return self._compiled[cuda_graphs]

    def hidden_states(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last hidden states of the decoder (LoRA applied), no LM head: (B, T, D) -> (B, T, Dlm)."""
        decoder = self.base_model().get_decoder()
        return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's transformer layers (what ``train.compile`` compiles one by one)."""
        decoder = self.base_model().get_decoder()
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{type(decoder).__name__} keeps no ``layers`` ModuleList; train.compile cannot find "
                            "its decoder layers")
        return layers

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head on selected hidden states: (..., Dlm) -> (..., V)."""
        return self.base_model().get_output_embeddings()(hidden)

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                yield name, param

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base LLM without adapters (retention checks compare against this)."""
        if not self.has_lora:
            yield
            return
        with self.model.disable_adapter():
            yield

    @property
    def checkpointing(self) -> bool:
        """Whether the decoder layers recompute their activations in the backward."""
        base = self.base_model()
        flag = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5; older: the next
        return bool(flag if flag is not None else getattr(base, "is_gradient_checkpointing", False))

    def base_model(self) -> nn.Module:
        """The underlying transformers model (without the peft wrapper)."""
        return self.model.get_base_model() if self.has_lora else self.model
