"""Speed options of the training step, applied to a built model (``qvlm bench`` measures each):

- ``train.gradient_checkpointing``: the Q-Former's layers (and, in stage 2, the LLM's decoder
  layers) keep only their inputs and recompute the rest during backward: less activation memory
  for about one extra forward;
- ``train.compile``: ``torch.compile`` each Q-Former layer and, in stage 2, each LLM decoder layer
  in place ("regional" compilation, ``nn.Module.compile``: parameter names, checkpoints and saved
  models are unchanged). The layers of one kind share one compiled graph, so compiling costs about
  as much as for one layer, and the LLM is compiled whichever entry point calls it (the training
  step runs its decoder without the LM head). A compiled layer runs its forward and its backward
  as a few fused kernels. Off by default: the first steps pay the compilation.
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
        compile_layers(model)
        on.append("compile")
    return on


def compile_layers(model, **options) -> int:
    """``torch.compile`` every Q-Former layer and every LLM decoder layer of ``model`` (a VLM) in
    place, with ``options`` for ``torch.compile`` (e.g. ``backend``); returns how many were compiled.
    Compiling again replaces the earlier compilation."""
    layers = list(model.qformer.layers)
    if model.llm is not None:
        layers += list(model.llm.decoder_layers())
    for layer in layers:
        layer.compile(**options)
    return len(layers)


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
