"""Training never dies on a record: batches are refilled after skips (in runs of bad records, at
batch 4), every per-record failure is a counted skip, a resumed run equals a straight one bit for
bit, a source with less than one batch of usable records stops at once with the counts, and SIGKILL
at random moments of stage 2 followed by ``--resume`` ends where a straight run ends."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import CONFIGS, ROOT
from qvlm.cli import main
from qvlm.config import load_config
from qvlm.train.loop import train

BAD_REASONS = {"missing_file", "empty_file", "not_an_image", "truncated", "bad_caption_empty"}


def bad_records(folder: Path, image: str) -> list[dict]:
    """One record of each bad kind (their image files written into ``folder/images``)."""
    png = (folder / image).read_bytes()
    (folder / "images" / "empty.png").write_bytes(b"")
    (folder / "images" / "text.png").write_bytes(b"this is not an image\n")
    (folder / "images" / "half.png").write_bytes(png[: len(png) // 2])
    return [
        {"key": "bad-missing", "image": "images/nowhere.png", "caption": "a red circle"},
        {"key": "bad-empty", "image": "images/empty.png", "caption": "a red circle"},
        {"key": "bad-text", "image": "images/text.png", "caption": "a red circle"},
        {"key": "bad-half", "image": "images/half.png", "caption": "a red circle"},
        {"key": "bad-caption", "image": image, "caption": "   "},
        {"key": "bad-two-images", "image": image, "messages": [
            {"role": "user", "content": "<image> is it the same as <image>?"}, {"role": "assistant", "content": "yes"}]},
    ]


def dirty_source(folder: Path, n_good: int = 16) -> Path:
    """Synthetic scenes with a run of six bad records after every second good one."""
    assert main(["data", "synth", "--out", str(folder), "--n", str(n_good), "--image-size", "32"]) == 0
    good = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    bad = bad_records(folder, good[0]["image"])
    lines = []
    for i, record in enumerate(good):
        lines.append(record)
        if i % 2 == 1:
            lines.extend(dict(b, key=f"{b['key']}-{i}") for b in bad)
    path = folder / "dirty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> Path:
    return dirty_source(tmp_path_factory.mktemp("dirty"))


def tiny(stage: int, source: Path, *overrides: str):
    return load_config(CONFIGS / "tiny.yaml", [f"train.stage={stage}", f"data.source={source}", "train.batch_size=4",
                                               "eval.max_samples=0", "train.save_every=1", *overrides])


def skipped_counts(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / latest / "trainer.json").read_text())["data"]["counts"]


def weights(run: Path) -> dict:
    return {f"{p.name}:{k}": v for p in sorted((run / "model").glob("*.safetensors")) for k, v in load_file(p).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert bool((wa[key] == wb[key]).all()), key


@pytest.mark.parametrize("stage", [1, 2])
def test_runs_of_bad_records_are_skipped_and_resume_is_exact(dirty, tmp_path, stage):
    """Eight steps at batch 4 over 16 good records among 48 bad ones (two epochs): every batch is
    full, the skips are counted by reason, and a run stopped at step 3 and resumed ends with the
    straight run's weights."""
    cfg = tiny(stage, dirty, "train.max_steps=8")
    train(cfg, tmp_path / "straight", progress=False)
    counts = skipped_counts(tmp_path / "straight")
    assert BAD_REASONS <= set(counts["skipped"]), counts
    assert counts["used"] == 8 * 4  # every batch was filled to its size
    assert counts["skipped"].get("several_images", 0) > 0, counts  # two <image> placeholders
    assert train(cfg, tmp_path / "resumed", progress=False, stop_at_step=3)["stopped"]
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert skipped_counts(tmp_path / "resumed") == counts


def test_less_than_one_batch_of_usable_records_stops_at_once(dirty, tmp_path, capsys):
    folder = dirty.parent
    lines = dirty.read_text().splitlines()
    bad = [line for line in lines if '"bad-' in line and "two-images" not in line]  # usable in stage 1: a caption
    few = bad + [line for line in lines if '"bad-' not in line][:3]
    source = folder / "few.jsonl"
    source.write_text("\n".join(few) + "\n")
    capsys.readouterr()
    assert main(["train", str(CONFIGS / "tiny.yaml"), f"data.source={source}", "train.batch_size=4",
                 "train.max_steps=2", "eval.max_samples=0", "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gave 3 usable records, fewer than one batch (4)" in err, err
    assert all(reason in err for reason in BAD_REASONS), err


KILLED_RUN = ["train.stage=2", "train.max_steps=12", "train.save_every=1", "train.batch_size=4", "eval.max_samples=0",
              "train.losses={lm: 1, replay: 0.5}", "train.replay_batch_size=2"]


# The random tiny LLM answers no replay instruction to the end, so every process replays fixed pairs.
REPLAY_PAIRS = [("Say hi.", "Hi there."), ("Name a fruit.", "An apple."), ("Count to two.", "One, two.")]
CHILD = f"""
import sys
import qvlm.train.replay as R
R.base_answers = lambda lm, prompts, exclude=(): R.ReplaySet(list({REPLAY_PAIRS!r}), {{}})
from qvlm.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def start_run(run: Path, source: Path, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-c", CHILD, "train", str(CONFIGS / "tiny.yaml"), *KILLED_RUN,
            f"data.source={source}", "--out", str(run), "--no-progress", *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(run.parent / f"{run.name}.log", "a") as log:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)


def log_tail(run: Path) -> str:
    return (run.parent / f"{run.name}.log").read_text()[-3000:]


def kill_after_step(proc: subprocess.Popen, run: Path, step: int, rng: random.Random) -> None:
    """SIGKILL ``proc`` at a random moment after checkpoint ``step`` appeared (mid-step or mid-write)."""
    deadline = time.time() + 300

    def reached() -> bool:
        return any(int(p.name.split("-")[1]) >= step for p in (run / "checkpoints").glob("step-*"))

    while not reached():
        assert proc.poll() is None, log_tail(run)
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, log_tail(run)  # killed mid-run, not finished before


def test_sigkill_at_random_moments_of_stage_2_then_resume_is_exact(dirty, tmp_path, monkeypatch):
    """Stage 2 with text replay on dirty data, killed twice at random moments and resumed: the
    projector, LoRA and Q-Former weights end as in a straight run (replay and data positions
    restored from the checkpoint)."""
    rng = random.Random(int(os.environ.get("QVLM_KILL_SEED", "0")))
    run = tmp_path / "killed"
    kill_after_step(start_run(run, dirty, resume=False), run, 2, rng)
    kill_after_step(start_run(run, dirty, resume=True), run, 6, rng)
    proc = start_run(run, dirty, resume=True)
    assert proc.wait(timeout=600) == 0, log_tail(run)
    import qvlm.train.replay as R

    monkeypatch.setattr(R, "base_answers", lambda lm, prompts, exclude=(): R.ReplaySet(list(REPLAY_PAIRS), {}))
    straight = tmp_path / "straight"
    train(load_config(CONFIGS / "tiny.yaml", [*KILLED_RUN, f"data.source={dirty}"]), straight, progress=False)
    assert_same_weights(straight, run)
    assert any("lora" in key for key in weights(run))
