"""``data inspect``: counts by reason on mixed good/bad records, caption stats, and the grid PNG."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from qvlm.data.commands import run_inspect
from data_fixtures import write_bad_inputs


def test_inspect_mixed_jsonl(tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    out = run_inspect(expected["path"], grid=tmp_path / "grid.png")
    assert out["records"] == expected["records"] and out["used"] == expected["used"]
    assert out["skipped"] == expected["skipped"] and out["notes"] == expected["notes"]
    chars = out["caption_chars"]
    assert chars["min"] == len("noise") and 1024 < chars["max"] <= 2048
    assert chars["min"] < chars["mean"] < chars["max"]
    grid = Image.open(out["grid"])
    assert grid.format == "PNG" and grid.size[0] == 4 * 160 and grid.size[1] >= 4 * 160
    assert len(np.unique(np.asarray(grid.convert("L")))) > 10  # images and text were drawn
    json.dumps(out)  # one JSON object for --json


def test_inspect_synth_with_limit(tmp_path):
    out = run_inspect("synth:n=50,image_size=32", grid=tmp_path / "g.png", max_records=7)
    assert out["records"] == 7 and out["used"] == 7 and out["skipped"] == {}
    assert (tmp_path / "g.png").is_file()
    assert run_inspect("synth:n=5", split="heldout", max_records=3)["grid"] is None
