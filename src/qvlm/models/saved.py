"""The saved-model folder: base models that live in local folders travel with it.

``VLM.save_pretrained`` copies every base model whose source is a local HF folder (the demo's
pretrained vision tower, an exported LLM) into ``MODEL/base/<role>/`` and records the source
relative to the model folder; ``VLM.from_pretrained`` turns such relative sources back into paths.
Hub ids, GGUF files, ``pkg:`` and ``random:`` sources are recorded as they are.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from qvlm import model_sources as sources
from qvlm.config import Config

SOURCE_KEYS = (("vision", "source"), ("qformer", "source"), ("qformer", "tokenizer"),
               ("llm", "source"), ("llm", "tokenizer"))


def bundle_sources(cfg: Config, folder: Path) -> Config:
    """A copy of ``cfg`` whose local-folder sources point into ``folder/base/`` (copied there)."""
    cfg = copy.deepcopy(cfg)
    for block, key in SOURCE_KEYS:
        section = getattr(cfg.model, block)
        text = getattr(section, key)
        if not text or text.startswith(("pkg:", "random:")):
            continue
        src = sources.resolve(text)
        if src.kind != "dir":
            continue
        origin = Path(src.path).resolve()
        rel = Path("base") / f"{block}-{key}" if key == "tokenizer" else Path("base") / block
        target = folder / rel
        if origin != target.resolve():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(origin, target)
        setattr(section, key, str(rel))
    return cfg


def localize_sources(cfg: Config, folder: Path) -> Config:
    """Relative sources that exist inside ``folder`` become absolute paths."""
    for block, key in SOURCE_KEYS:
        section = getattr(cfg.model, block)
        text = getattr(section, key)
        if text and not text.startswith(("pkg:", "random:")) and not Path(text).is_absolute() \
                and (folder / text).exists():
            setattr(section, key, str((folder / text).resolve()))
    return cfg
