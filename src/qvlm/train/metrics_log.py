"""Where training metrics go: ``OUT/metrics.jsonl`` always (one JSON object per line), and
TensorBoard event files under ``OUT/tensorboard/`` with ``train.tensorboard=true`` (needs the
``tensorboard`` package: ``pip install tensorboard``). Only rank 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qvlm import distributed as D


class MetricsLog:
    def __init__(self, out: Path, tensorboard: bool = False):
        self.path = out / "metrics.jsonl"
        self.board = None
        if tensorboard and D.rank() == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package: "
                                   "pip install tensorboard") from exc
            self.board = SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if D.rank() != 0:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self.board is not None:
            for name, value in scalars(record):
                self.board.add_scalar(name, value, global_step=int(record["step"]))
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def scalars(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """Numeric leaves of a metrics record as (tag, value), nested keys joined by "/" (step left out);
    train terms go under ``train/``."""
    out = []
    for key, value in record.items():
        if key == "step" and not prefix:
            continue
        tag = f"{prefix}{key}" if prefix else (key if isinstance(value, dict) else f"train/{key}")
        if isinstance(value, dict):
            out += scalars(value, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((tag, float(value)))
    return out
