"""`qvlm data synth` and `qvlm data inspect` through cli.main, as a user runs them."""

import json

from PIL import Image

from qvlm.cli import main
from data_fixtures import write_bad_inputs


def test_data_synth_writes_splits(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["data", "synth", "--out", str(out), "--n", "12", "--n-test", "4", "--n-heldout", "3"]) == 0
    for split, n in (("train", 12), ("test", 4), ("heldout", 3)):
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        first = json.loads(lines[0])
        assert (out / first["image"]).is_file() and first["caption"] and first["attributes"]
    capsys.readouterr()
    assert main(["data", "inspect", str(out / "train.jsonl"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 12 and report["used"] == 12 and report["skipped"] == {}


def test_data_inspect_mixed_jsonl_counts_and_grid(tmp_path, capsys):
    expected = write_bad_inputs(tmp_path / "bad")
    jsonl = next((tmp_path / "bad").glob("*.jsonl"))
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", str(jsonl), "--json", "--grid", str(grid)]) == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    assert report["used"] == expected["used"]
    assert report["skipped"] == expected["skipped"]
    assert report["records"] == expected["used"] + sum(expected["skipped"].values())
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size[0] > 64


def test_data_inspect_missing_source_is_an_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope.jsonl"), "--json"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
