"""Damaged files are named, never a traceback: checkpoints that check themselves (``--resume`` falls
back to the newest intact one), one-line load errors for every command that reads a model folder,
input images that cannot be read, and no silent overwrite of a finished run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import CONFIGS
from qvlm.cli import main

OLD_RUN = Path(__file__).resolve().parent / "fixtures" / "old_run"  # small saved models (tests/test_old_runs.py)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("qvlm ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == lines[0], err[-2000:]  # nothing after it
    return lines[0]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    """A finished tiny stage-1 run with checkpoints at steps 2 and 3."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", str(CONFIGS / "tiny.yaml"), "train.max_steps=3", "train.save_every=1",
                 "eval.max_samples=0", "--out", str(run), "--no-progress"]) == 0
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_checkpoint_verify_names_the_damaged_file(stage1_run, tmp_path, capsys):
    run = copy_run(stage1_run, tmp_path)
    assert main(["checkpoint", "verify", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["checkpoints"]] == ["step-3", "step-2"] and report["newest_intact"] == "step-3"
    truncate(run / "checkpoints" / "step-3" / "model.safetensors")
    changed = run / "checkpoints" / "step-2" / "optimizer.json"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 1  # one bit: the same size, another SHA-256
    changed.write_bytes(bytes(data))
    assert main(["checkpoint", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step-3: damaged" in out and "step-3/model.safetensors" in out and "bytes" in out
    assert "step-2: damaged" in out and "step-2/optimizer.json: changed since it was written" in out


def test_resume_skips_a_truncated_newest_checkpoint(stage1_run, tmp_path, capsys):
    """A truncated file in the newest checkpoint: ``--resume`` warns naming it and continues from
    the previous one, ending where a straight run ends."""
    run = copy_run(stage1_run, tmp_path)
    damaged = run / "checkpoints" / "step-3" / "model.safetensors"
    truncate(damaged)
    capsys.readouterr()
    assert main(["train", str(CONFIGS / "tiny.yaml"), "train.max_steps=4", "train.save_every=1",
                 "eval.max_samples=0", "--out", str(run), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "checkpoints: step-3 damaged, step-2 intact" in err
    assert f"warning: step-3 is damaged and is not used: {damaged}" in err
    assert "(step 2" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    straight = tmp_path / "straight"
    assert main(["train", str(CONFIGS / "tiny.yaml"), "train.max_steps=4", "eval.max_samples=0",
                 "--out", str(straight), "--no-progress"]) == 0
    for block in ("qformer", "heads"):
        ours = (run / "model" / f"{block}.safetensors").read_bytes()
        assert ours == (straight / "model" / f"{block}.safetensors").read_bytes(), block


def test_resume_with_no_intact_checkpoint_stops_with_one_line(stage1_run, tmp_path, capsys):
    run = copy_run(stage1_run, tmp_path)
    for step in ("step-2", "step-3"):
        truncate(run / "checkpoints" / step / "rng.safetensors")
    capsys.readouterr()
    assert main(["train", str(CONFIGS / "tiny.yaml"), "train.max_steps=4", "eval.max_samples=0",
                 "--out", str(run), "--resume", "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no intact checkpoint" in line and "checkpoint verify" in line


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_train_into_a_run_refuses_and_leaves_it_untouched(stage1_run, tmp_path, capsys):
    run = copy_run(stage1_run, tmp_path)
    before = tree_digest(run)
    capsys.readouterr()
    assert main(["train", str(CONFIGS / "tiny.yaml"), "train.max_steps=1", "--out", str(run), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert tree_digest(run) == before
    assert main(["train", str(CONFIGS / "tiny.yaml"), "train.max_steps=1", "eval.max_samples=0", "--out", str(run),
                 "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-1"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A copy of a small saved stage-2 model folder, to damage."""
    target = tmp_path / "model"
    shutil.copytree(OLD_RUN / "stage2" / "model", target)
    return target


def image_file(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


def commands(model: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Every command that loads a model folder."""
    img = str(image_file(tmp_path))
    return {
        "eval caption": ["eval", "caption", "--model", str(model), "--data", "synth:n=8,image_size=32",
                         "--max-samples", "2", "--json"],
        "eval retrieval": ["eval", "retrieval", "--model", str(model), "--data", "synth:n=8,image_size=32",
                           "--max-samples", "4", "--json"],
        "caption": ["caption", "--model", str(model), img],
        "chat": ["chat", "--model", str(model), img, "--prompt", "What is it?"],
        "export": ["export", "--model", str(model), "--out", str(tmp_path / "exported")],
        "serve": ["serve", "--model", str(model), "--port", "0"],
    }


@pytest.mark.parametrize("damage", ["truncated", "missing", "config"])
def test_a_damaged_model_folder_gives_one_line_naming_the_file(model_dir, tmp_path, capsys, damage):
    if damage == "truncated":
        bad, words = model_dir / "lora.safetensors", "not a readable safetensors file"
        truncate(bad)
    elif damage == "missing":
        bad, words = model_dir / "qformer.safetensors", "missing"
        bad.unlink()
    else:
        bad, words = model_dir / "config.yaml", "not valid YAML"
        bad.write_text("model: [unclosed\n")
    for name, argv in commands(model_dir, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 1, name
        line = one_error_line(capsys.readouterr().err)
        assert str(bad) in line and words in line, (name, line)


def test_init_from_a_damaged_stage1_model_names_the_file(tmp_path, capsys):
    stage1 = tmp_path / "stage1"
    shutil.copytree(OLD_RUN / "stage1" / "model", stage1)
    truncate(stage1 / "qformer.safetensors")
    import yaml

    qformer = yaml.safe_load((stage1 / "config.yaml").read_text())["model"]["qformer"]["source"]
    capsys.readouterr()
    assert main(["train", str(CONFIGS / "tiny.yaml"), f"model.qformer.source={qformer}", "train.stage=2",
                 "train.max_steps=1", f"train.init_from={stage1}", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "train.init_from" in line and str(stage1 / "qformer.safetensors") in line


@pytest.mark.parametrize("content, words", [(b"", "the image is empty"),
                                            (b"not an image at all", "not an image PIL can read")])
def test_an_unreadable_input_image_is_named_in_words(model_dir, tmp_path, capsys, content, words):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    for argv in (["caption", "--model", str(model_dir), str(bad)],
                 ["chat", "--model", str(model_dir), str(bad), "--prompt", "What is it?"]):
        capsys.readouterr()
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err)
        assert str(bad) in line and words in line and "SkipRecord" not in line, line
