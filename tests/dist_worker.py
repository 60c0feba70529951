"""A worker that tests/test_distributed.py starts under torchrun (one copy per process).

    dist_worker.py train OUT [--stop-at N] [--resume] [--die-at N] [a.b=c ...]
        stage-1 training with configs/tiny.yaml; --die-at N: rank 1 SIGKILLs itself in step N
    dist_worker.py epoch OUT SHARDS [a.b=c ...]
        read one epoch of the training stream on every rank; rank 0 writes OUT/seen.json
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> tuple[list[str], dict, list[str]]:
    flags, overrides, positional = {}, [], []
    it = iter(argv)
    for arg in it:
        if arg in ("--stop-at", "--die-at"):
            flags[arg[2:].replace("-", "_")] = int(next(it))
        elif arg == "--resume":
            flags["resume"] = True
        elif "=" in arg:
            overrides.append(arg)
        else:
            positional.append(arg)
    return positional, flags, overrides


def run_train(out: str, flags: dict, overrides: list[str]) -> None:
    from qvlm.config import load_config
    from qvlm import distributed as D
    from qvlm.train import loop

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    if "die_at" in flags:
        real_step = loop.train_step
        calls = {"n": 0}

        def dying_step(*args, **kwargs):
            calls["n"] += 1
            if D.rank() == 1 and calls["n"] == flags["die_at"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(*args, **kwargs)

        loop.train_step = dying_step
    loop.train(cfg, out, resume=flags.get("resume", False), progress=False, stop_at_step=flags.get("stop_at"))


def run_epoch(out: str, shards: str, overrides: list[str]) -> None:
    from qvlm.config import load_config
    from qvlm.models.vlm import VLM
    from qvlm import distributed as D
    from qvlm.train.batches import build_stream

    accelerator = D.setup(60)  # noqa: F841  (initialises the process group)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.source={shards}", *overrides])
    model = VLM.from_config(cfg, with_llm=False)
    stream = build_stream(cfg, model, split="train")
    keys = [item["key"] for items in stream.loader() for item in items  # raw items: records and markers
            if "skip" not in item and "shard_done" not in item]
    everyone = D.all_gather_object({"rank": D.rank(), "keys": keys})
    if D.rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "seen.json").write_text(json.dumps(everyone))


def main() -> None:
    from qvlm import distributed as D

    positional, flags, overrides = parse(sys.argv[1:])
    try:
        if positional[0] == "train":
            run_train(positional[1], flags, overrides)
        elif positional[0] == "epoch":
            run_epoch(positional[1], positional[2], overrides)
        else:
            raise SystemExit(f"unknown scenario {positional[0]!r}")
    finally:
        several = D.teardown()
    if several:
        D.exit_rank(0)  # as `qvlm train` ends a rank


if __name__ == "__main__":
    main()
