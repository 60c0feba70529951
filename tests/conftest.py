"""Shared fixtures. Tests never touch the network: the hub is offline for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture
def tiny_cfg():
    from qvlm.config import load_config

    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_vlm_session():
    """The tiny VLM with LLM (built once: the GGUF tokenizer takes seconds)."""
    from qvlm.config import load_config
    from qvlm.models.vlm import VLM

    return VLM.from_config(load_config(CONFIGS / "tiny.yaml"), with_llm=True)


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory):
    """A saved tiny stage-2 model for the serving tests (see tests/serve_helpers.py)."""
    from serve_helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-vlm")
