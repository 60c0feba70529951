"""Multi-process training on CPU (gloo): 2 real processes started by torchrun / accelerate launch.

- 2 processes x batch 4 make the same losses and the same update as 1 process x batch 8 (ITC+ITM+ITG);
- one epoch of sharded data over 2 ranks x 2 workers reads every record exactly once;
- a checkpoint written by 2 processes resumes in 1 and continues the 2-process loss curve;
- a rank that dies takes the whole job down with an error instead of a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qvlm.config import load_config
from data_fixtures import write_shards
from qvlm.eval.retrieval import evaluate_retrieval
from qvlm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
NO_DROPOUT = "model.qformer.dropout=0"  # dropout masks cannot match between 1 and 2 processes
COMMON = [NO_DROPOUT, "train.precision=fp32", "eval.max_samples=0", "train.warmup_steps=1", "train.lr=1e-4",
          "train.losses={itc: 1, itm: 1, itg: 1}"]
TIMEOUT = 240

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun(*args: str, nproc: int = 2, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", WORKER, *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def losses(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def evals(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r["eval"].items() if k != "primary"} for r in rows if "eval" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((out / "model").glob("*.safetensors")):
        tensors.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    assert tensors
    return tensors


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"largest parameter difference {worst:.2e} > {atol:.0e}"


def test_two_processes_by_4_equal_one_process_by_8(tmp_path):
    # and the periodic retrieval eval, split over the ranks (3 eval batches: 2 on rank 0, 1 on rank 1)
    steps = ["train.max_steps=2", "train.eval_every=1", "eval.max_samples=24", "eval.batch_size=8",
             "eval.itm_rerank_k=4"]
    one = tmp_path / "one"
    train(load_config(ROOT / "configs" / "tiny.yaml", [*COMMON, *steps, "train.batch_size=8"]), one, progress=False,
          eval_fn=evaluate_retrieval)
    # the real command line under `accelerate launch`
    two = tmp_path / "two"
    qvlm = str(Path(sys.executable).with_name("qvlm"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0", "--multi_gpu", qvlm, "train",
           str(ROOT / "configs" / "tiny.yaml"), *COMMON, *steps, "train.batch_size=4", "--out", str(two),
           "--no-progress"]
    check(subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT))
    rows_one, rows_two = losses(one), losses(two)
    assert len(rows_one) == len(rows_two) == 2
    for r1, r2 in zip(rows_one, rows_two):
        for term in ("loss", "itc", "itm", "itg"):
            assert r1[term] == pytest.approx(r2[term], abs=1e-5), (term, r1, r2)
        assert r2["samples_per_s"] > 0
    assert_same(weights(one), weights(two), atol=1e-5)
    evals_one, evals_two = evals(one), evals(two)
    assert len(evals_one) == len(evals_two) == 2 and evals_two[0]["n"] == 24
    for e1, e2 in zip(evals_one, evals_two):
        assert e1 == pytest.approx(e2, abs=1e-6)


def test_one_epoch_of_shards_over_2_ranks_by_2_workers(tmp_path):
    shards = write_shards(tmp_path / "wds", shards=8, per_shard=3, image_size=32)
    proc = torchrun("epoch", str(tmp_path / "out"), str(tmp_path / "wds"), "data.num_workers=2",
                    "train.batch_size=2")
    check(proc)
    seen = json.loads((tmp_path / "out" / "seen.json").read_text())
    per_rank = [set(part["keys"]) for part in seen]
    everything = [k for part in seen for k in part["keys"]]
    assert Counter(everything) == Counter(shards["keys"])  # every record once: no duplicate, no gap
    assert all(per_rank) and not per_rank[0] & per_rank[1]


def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
    args = [*COMMON, "train.max_steps=4", "train.save_every=2"]
    first = tmp_path / "two"
    check(torchrun("train", str(first), "--stop-at", "2", *args, "train.batch_size=4"))
    assert (first / "checkpoints" / "step-2").is_dir()
    other = tmp_path / "one"
    subprocess.run(["cp", "-r", str(first), str(other)], check=True)
    check(torchrun("train", str(first), "--resume", *args, "train.batch_size=4"))  # 2 processes go on
    check(torchrun("train", str(other), "--resume", *args, "train.batch_size=8", nproc=1))  # 1 process goes on
    two, one = losses(first), losses(other)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for r2, r1 in zip(two, one):
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4), (r1, r2)
    assert_same(weights(first), weights(other), atol=1e-4)


def test_a_dead_rank_ends_the_job_with_an_error(tmp_path):
    start = time.monotonic()
    proc = torchrun("train", str(tmp_path / "run"), "--die-at", "2", *COMMON, "train.max_steps=50",
                    "train.batch_size=4", "train.dist_timeout_s=60", timeout=180)
    assert proc.returncode != 0
    assert time.monotonic() - start < 150
    assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr or "exitcode" in proc.stderr, proc.stderr[-3000:]


def test_stage2_two_processes_match_one(tmp_path):
    """The LM loss is the token mean of the whole batch, not the mean of the ranks' means."""
    args = ["model.qformer.dropout=0", "model.llm.lora.dropout=0", "train.stage=2", "train.precision=fp32",
            "train.max_steps=2", "eval.max_samples=0", "train.warmup_steps=1"]
    one = tmp_path / "one"
    train(load_config(ROOT / "configs" / "tiny.yaml", [*args, "train.batch_size=8"]), one, progress=False)
    check(torchrun("train", str(tmp_path / "two"), *args, "train.batch_size=4"))
    for r1, r2 in zip(losses(one), losses(tmp_path / "two"), strict=True):
        assert r1["lm"] == pytest.approx(r2["lm"], abs=1e-5)
    assert_same(weights(one), weights(tmp_path / "two"), atol=1e-5)


def test_a_finished_rank_exits_with_its_code_and_flushed_streams():
    # exit_rank skips the interpreter's teardown (where gloo's threads can abort a rank): what was
    # printed still arrives, the code is the one given, and no atexit handler runs
    script = ("import atexit, sys\nfrom qvlm import distributed as D\n"
              "assert D.teardown() is False  # no process group: nothing to destroy\n"
              "atexit.register(lambda: print('atexit ran'))\n"
              "print('saved', end='')\nsys.stderr.write('note')\nD.exit_rank(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "saved", "note")
