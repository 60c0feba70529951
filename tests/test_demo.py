"""`qvlm demo --quick`: the whole pipeline on tiny models, and the report it writes."""

import json

from PIL import Image

from qvlm.cli import main

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
