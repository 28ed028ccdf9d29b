"""Timing of optimizer steps: warm-up, interleaved rounds, medians with spread.

One *sample* is one optimizer step:

* CPU: wall time of ``step()`` (``time.perf_counter``), back to back; nothing is flushed, so a set
  that fits in the last-level cache is timed warm, as in a tight training loop.
* GPU: the stream is idle before the sample (an L2-sized buffer is zeroed first, to evict the
  previous step's data, then the host synchronizes), the sample is the device-event time from just
  before the first launch to the end of the last kernel. The host launch overhead therefore counts
  whenever the GPU would wait for it (the for-loop variants), as it does for a step issued on an
  idle stream.

Rounds are interleaved: every round runs each variant for ``per_round`` samples, in an order
rotated by one each round, so that drift of the machine (clock, neighbours on a shared CPU) hits
every variant alike. Statistics are over all samples of all rounds.

A case that times parts of one sample itself (a training iteration's forward+backward and its
step; a distributed step and the all-reduce inside it) runs in the same rounds through
:func:`run_interleaved_parts`: its call returns ``{part: seconds}``, typically from
:meth:`Timer.now` readings.

A :class:`Budget` caps a whole run (``bench_step.py --budget-s``): its ``deadline`` handed to
:func:`run_interleaved` / :func:`run_interleaved_parts` stops the rounds once it has passed (every
case keeps at least one round).

The API the benchmarks use (bench_step.py, bench_iteration.py, python_cost.py,
bench_distributed.py): ``Timer``, ``Case``, ``run_interleaved``, ``run_interleaved_parts``,
``summarize``, ``Budget``, ``Progress``, ``CopyProbe``.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch


class Budget:
    """Wall-clock seconds for a whole run, counted from construction (``time.perf_counter``)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def expired(self) -> bool:
        return self.left() <= 0


class Progress:
    """One line on stderr, rewritten in place on a terminal; plain lines now and then elsewhere."""

    def __init__(self, stream=sys.stderr, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self._last_plain = 0.0
        self._width = 0

    def update(self, msg: str, force: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        line = f"[{elapsed:6.1f}s] {msg}"
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
            self.stream.flush()
        elif force or elapsed - self._last_plain >= 5.0:
            self._last_plain = elapsed
            self.stream.write(line + "\n")
            self.stream.flush()

    def done(self, msg: str = "") -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        if msg:
            self.stream.write(msg + "\n")
        self.stream.flush()


class Timer:
    """Times one call of a function on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.flush_buf: Optional[torch.Tensor] = None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            l2 = int(getattr(props, "L2_cache_size", 0) or (50 << 20))
            self.flush_bytes = 2 * l2
            self.flush_buf = torch.empty(self.flush_bytes // 4, dtype=torch.int32, device=self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        else:
            self.flush_bytes = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def now(self) -> float:
        """``time.perf_counter()`` once the device has finished what was queued: readings around
        parts of a sample (run_interleaved_parts) time what the device did in between."""
        self.sync()
        return time.perf_counter()

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds that one call of ``fn`` takes."""
        if self.cuda:
            self.flush()
            torch.cuda.synchronize(self.device)
            self._start.record()
            fn()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@dataclass
class Case:
    """A variant to time: ``step`` is timed, ``before`` (untimed) runs before every sample."""

    name: str
    step: Callable[[], object]
    before: Optional[Callable[[], object]] = None
    per_round: Optional[int] = None  # samples per round; None: run_interleaved's per_round


def _warm_up(timer: Timer, cases: Sequence[Case], warmup: int, progress: Optional[Progress],
             label: str) -> None:
    for c in cases:
        if progress:
            progress.update(f"{label} warm-up {c.name}")
        for _ in range(warmup):
            if c.before:
                c.before()
            c.step()
        timer.sync()


def _schedule(cases: Sequence[Case], rounds: int, per_round: int, progress: Optional[Progress],
              label: str, deadline: Optional[float]) -> Iterator[Case]:
    """Each case once per sample: ``rounds`` rounds, each running every case for its samples per
    round in an order rotated by one each round; no round starts after ``deadline`` (a
    ``time.perf_counter()`` value) but the first. ``before`` runs (untimed) before each sample."""
    k = len(cases)
    for r in range(rounds):
        if r > 0 and deadline is not None and time.perf_counter() >= deadline:
            if progress:
                progress.update(f"{label} stopped after {r}/{rounds} rounds: time budget spent",
                                force=True)
            return
        for c in (cases[(r + i) % k] for i in range(k)):
            if progress:
                progress.update(f"{label} round {r + 1}/{rounds} {c.name}")
            for _ in range(c.per_round or per_round):
                if c.before:
                    c.before()
                yield c


def run_interleaved(
    timer: Timer,
    cases: Sequence[Case],
    *,
    warmup: int,
    rounds: int,
    per_round: int,
    progress: Optional[Progress] = None,
    label: str = "",
    deadline: Optional[float] = None,
) -> Dict[str, List[float]]:
    """Samples (seconds, ``timer`` around each ``step``) per case name, after ``warmup`` untimed
    steps of each case, in interleaved rounds (see _schedule)."""
    _warm_up(timer, cases, warmup, progress, label)
    samples: Dict[str, List[float]] = {c.name: [] for c in cases}
    for c in _schedule(cases, rounds, per_round, progress, label, deadline):
        samples[c.name].append(timer(c.step))
    return samples


def run_interleaved_parts(
    timer: Timer,
    cases: Sequence[Case],
    *,
    warmup: int,
    rounds: int,
    per_round: int,
    progress: Optional[Progress] = None,
    label: str = "",
    deadline: Optional[float] = None,
) -> Dict[str, Dict[str, List[float]]]:
    """Like :func:`run_interleaved` for cases that time themselves: each ``step`` returns
    ``{part: seconds}`` for one sample; the result is, per case name, each part's samples in
    sample order (the i-th entries of all parts belong to one sample)."""
    _warm_up(timer, cases, warmup, progress, label)
    samples: Dict[str, Dict[str, List[float]]] = {c.name: {} for c in cases}
    for c in _schedule(cases, rounds, per_round, progress, label, deadline):
        for part, seconds in c.step().items():
            samples[c.name].setdefault(part, []).append(seconds)
    return samples


def summarize(xs: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles, min and max of the samples (seconds), and their count."""
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = xs[0]
    return {
        "n": len(xs),
        "median_s": statistics.median(xs),
        "p25_s": p25,
        "p75_s": p75,
        "min_s": xs[0],
        "max_s": xs[-1],
    }


class CopyProbe:
    """``dst.copy_(src)`` on two ``nbytes`` fp32 buffers: the machine's copy bandwidth.

    Timed up front and again as one more interleaved case in every param set's rounds, so that a
    set's "fraction of copy bandwidth" divides by a copy measured under the same conditions.
    Bytes moved per copy: 2 x nbytes.
    """

    def __init__(self, device: torch.device, nbytes: int):
        n = nbytes // 4
        self.src = torch.ones(n, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * n * 4

    def step(self) -> None:
        self.dst.copy_(self.src)

    def case(self) -> Case:
        return Case("copy", self.step)

    def stats(self, samples: Sequence[float]) -> Dict[str, object]:
        st: Dict[str, object] = dict(summarize(samples))
        st["bytes"] = self.bytes
        st["gbps"] = self.bytes / st["median_s"] / 1e9
        st["samples_s"] = list(samples)
        return st

    def measure(self, timer: Timer, samples: int = 10,
                progress: Optional[Progress] = None) -> Dict[str, object]:
        for _ in range(3):
            self.step()
        timer.sync()
        xs = []
        for i in range(samples):
            if progress:
                progress.update(f"copy bandwidth {i + 1}/{samples}")
            xs.append(timer(self.step))
        return self.stats(xs)


def cpu_name() -> str:
    """The CPU's model name, for the results' machine line."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
