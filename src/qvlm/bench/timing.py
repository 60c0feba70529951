"""Timing and memory for the benchmarks: interleaved median-of-repeats timing and peak memory.

``time_interleaved`` runs each variant once per round (after untimed warm-up rounds), so noise from
other jobs on a shared machine hits every variant alike, and reverses the order every other round,
so no variant always runs first or after the same neighbour (the first variant of a round can run
slowest); a variant's time is the median of its rounds. ``Ratio.of`` compares
two variants: the ratio of their medians, with a confidence interval from the rounds paired. With
``track_memory`` every variant is then called once more, untimed, inside ``PeakMemory``: on CUDA
``torch.cuda.max_memory_allocated`` (tensors only), on CPU the process's resident set size sampled
every 2 ms by a thread (everything the process holds: weights, optimiser state, activations, freed
memory malloc keeps, Python itself). That call starts from freed memory handed back to the OS
(``release_memory``), which would slow a timed call down: page faults.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # one per timed round
    memory: PeakMemory | None = None  # the untimed memory call, when tracked

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed rounds: how noisy the measurement was."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0


CONFIDENCE = 0.9  # the coverage a ratio's interval aims for


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values`` (independent draws):
    the k-th lowest and the k-th highest value, for the largest k whose coverage
    1 - 2 P(Binomial(n, 1/2) < k) is at least ``confidence`` (k = 1, the lowest and highest, when none
    is). Returns (low, high, coverage): 75% for 3 values, 94% for 5, 96% for 9 (k = 2)."""
    xs, n = sorted(values), len(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return xs[k - 1], xs[n - k], coverage(k)


class Ratio(float):
    """``ref.median / ours.median`` (ours faster by) of two variants timed in the same interleaved
    rounds, with the same ratio taken round by round: ``low`` and ``high`` bound the median per-round
    ratio (``median_interval`` over the ``rounds`` rounds, of confidence ``coverage``). A round runs
    both variants back to back, so a slow spell of the machine that hits both cancels in that round's
    ratio. An interval that contains 1.0 means the run could not tell the two apart. A float, so it
    goes wherever the plain ratio went."""

    low: float
    high: float
    rounds: int
    coverage: float

    def __new__(cls, value: float, low: float, high: float, rounds: int, coverage: float) -> Ratio:
        ratio = super().__new__(cls, value)
        ratio.low, ratio.high, ratio.rounds, ratio.coverage = low, high, rounds, coverage
        return ratio

    @classmethod
    def of(cls, ref: Timing, ours: Timing) -> Ratio:
        if len(ref.seconds) != len(ours.seconds) or not ref.seconds:
            raise ValueError(f"paired ratio needs the same rounds on both sides, got {len(ref.seconds)} and "
                             f"{len(ours.seconds)}")
        per_round = [r / o for r, o in zip(ref.seconds, ours.seconds)]
        low, high, coverage = median_interval(per_round)
        return cls(ref.median / ours.median, low, high, len(per_round), coverage)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for queued device work (CUDA kernels run asynchronously); nothing to wait for on CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None,
                     track_memory: torch.device | None = None) -> dict[str, Timing]:
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``repeats`` timed rounds,
    each round calling every variant once, in order, and in reverse order every other round; peak
    memory too with ``track_memory``."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    timings = {name: Timing() for name in variants}
    names = list(variants)
    for round_ in range(warmup + repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            fn = variants[name]
            sync()
            start = clock()
            fn()
            sync()
            if round_ >= warmup:
                timings[name].seconds.append(clock() - start)
    if track_memory is not None:
        for name, fn in variants.items():
            with PeakMemory(track_memory) as mem:
                fn()
            timings[name].memory = mem
    return timings


# ---- memory -----------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS reflects live memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb`` (highest during the block) and
    ``m.growth_mb`` (peak minus the level at entry). ``m.kind`` names what was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS (sampled every 2 ms)"
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20
