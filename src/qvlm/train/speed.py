"""Speed options of the training step, applied to a built model (``qvlm bench`` measures each):

- ``train.gradient_checkpointing``: the Q-Former's layers (and, in stage 2, the LLM's decoder
  layers) keep only their inputs and recompute the rest during backward: less activation memory
  for about one extra forward;
- ``train.compile``: ``torch.compile`` the Q-Former in place (``nn.Module.compile``: parameter
  names, checkpoints and saved models are unchanged). Off by default: the first steps pay the
  compilation, and on CPU it was not faster (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from qvlm.config import TrainConfig


def apply_speed_options(model, train: TrainConfig) -> list[str]:
    """Set the options on ``model`` (a VLM); returns the names of those switched on."""
    on = []
    model.qformer.gradient_checkpointing = train.gradient_checkpointing
    if train.gradient_checkpointing:
        on.append("gradient_checkpointing")
        if model.llm is not None:
            set_llm_checkpointing(model.llm, True)
    if train.compile:
        model.qformer.compile()
        on.append("compile")
    return on


def set_llm_checkpointing(lm, on: bool) -> None:
    """Activation checkpointing of a ``LanguageModel``'s decoder on or off (non-reentrant, the
    recomputation under the forward's LoRA position mask), under whichever name the installed
    transformers has (``activation_checkpointing_*`` from v5, else ``gradient_*``)."""
    hf_model = lm.base_model()
    if on:
        kwargs = {"use_reentrant": False, "context_fn": lm.checkpoint_contexts}
        if hasattr(hf_model, "activation_checkpointing_enable"):
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        disable = getattr(hf_model, "activation_checkpointing_disable", None) or hf_model.gradient_checkpointing_disable
        disable()
