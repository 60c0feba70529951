from pathlib import Path

import pytest

from qvlm.config import Config, ConfigError, dump_config, load_config

from conftest import CONFIGS


def test_defaults_are_the_article_recipe():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.qformer.num_queries == 32
    assert cfg.model.qformer.cross_attention_every == 2
    assert cfg.model.llm.source == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_precedence_defaults_then_yaml_then_overrides(tmp_path: Path):
    file = tmp_path / "c.yaml"
    file.write_text("train:\n  lr: 0.001\n  batch_size: 3\nmodel:\n  qformer:\n    num_queries: 8\n")
    cfg = load_config(file, ["train.lr=3e-4"])
    assert cfg.train.lr == pytest.approx(3e-4)  # override beats YAML
    assert cfg.train.batch_size == 3  # YAML beats default
    assert cfg.model.qformer.num_queries == 8
    assert cfg.train.max_steps == Config().train.max_steps  # default kept


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=1", "train.lrr"),
        ("model.qformer.num_query=4", "model.qformer.num_query"),
        ("nope.x=1", "nope"),
    ],
)
def test_unknown_keys_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=2.5", "train.batch_size"),
        ("train.lr=fast", "train.lr"),
        ("train.stage=3", "train.stage"),
        ("model.llm.lora.target_modules=q_proj", "model.llm.lora.target_modules"),
        ("train.losses={itc: fast}", "train.losses.itc"),
        ("train.losses={xyz: 1}", "train.losses"),
        ("model.llm.use_lora=maybe", "model.llm.use_lora"),
        ("model.vision=3", "model.vision"),
        ("data.caption_prob=1.5", "data.caption_prob"),
        ("train.replay_batch_size=0", "train.replay_batch_size"),
        ("model.llm.lora.positions=text", "model.llm.lora.positions"),
        ("model.qformer.cross_attention_qk_gain=-1", "model.qformer.cross_attention_qk_gain"),
    ],
)
def test_bad_types_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_unknown_key_in_yaml_file(tmp_path: Path):
    file = tmp_path / "c.yaml"
    file.write_text("model:\n  qformer:\n    queries: 8\n")
    with pytest.raises(ConfigError, match=r"model\.qformer\.queries"):
        load_config(file)


def test_bad_yaml_and_missing_file(tmp_path: Path):
    file = tmp_path / "bad.yaml"
    file.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml", "blip2-smollm2.yaml", "blip2-smollm2-hf.yaml"])
def test_yaml_round_trip(name, tmp_path: Path):
    cfg = load_config(CONFIGS / name, ["train.losses={itc: 1.0}", "model.llm.lora.r=16"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    again = load_config(dumped)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_losses_subset_is_one_setting():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.losses={itc: 1}"])
    assert cfg.train.losses == {"itc": 1.0}


@pytest.mark.parametrize("positions", ["image", "from_image"])
def test_replay_with_position_limited_lora_is_refused(positions):
    """Text-only replay never reaches adapters that act from the image on only: a wasted loss."""
    with pytest.raises(ConfigError, match=rf"train\.losses must be without replay.*positions={positions}"):
        load_config(CONFIGS / "tiny.yaml", ["train.stage=2", "train.losses={lm: 1, replay: 1}",
                                            f"model.llm.lora.positions={positions}"])
    assert load_config(CONFIGS / "tiny.yaml", [f"model.llm.lora.positions={positions}"]).model.llm.lora.positions \
        == positions


def test_removed_keys_of_older_runs_are_dropped_with_a_warning_naming_them(tmp_path):
    """A config.yaml written before the CPU speed options were removed still loads: each removed key
    is named in one warning and dropped; an unknown key that never existed is still an error."""
    from qvlm.config import REMOVED_KEYS

    old = tmp_path / "config.yaml"
    old.write_text("data:\n  pad_to_multiple_of: 16\ntrain:\n  fused_qkv: true\n  itc_one_pass: false\n"
                   "  lr: 0.001\n")
    with pytest.warns(UserWarning, match="no longer") as caught:
        cfg = load_config(old, ["train.share_prompt_prefix=auto"])
    message = str(caught[0].message)
    for key in ("data.pad_to_multiple_of", "train.fused_qkv", "train.itc_one_pass", "train.share_prompt_prefix"):
        assert key in message
    assert cfg.train.lr == 0.001 and "train.fused_qkv" in REMOVED_KEYS
    with pytest.raises(ConfigError, match="train.fused_qkvv"):
        load_config(None, ["train.fused_qkvv=true"])
