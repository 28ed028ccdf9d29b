#!/usr/bin/env python
"""Time one optimizer step: SNGM (every backend on this machine) against torch.optim.SGD.

    python benchmarks/bench_step.py                 # quick: ResNet-20 and ResNet-50 shapes (GPU: + GPT-2)
    python benchmarks/bench_step.py --full          # + GPT-2 / 1B decoder, tensor-count and size sweeps
    python benchmarks/bench_step.py --device cuda --out DIR

Variants (all with lr=0.1, momentum=0.9, weight_decay=1e-4):

    sgd-forloop        torch.optim.SGD(foreach=False)
    sgd-foreach        torch.optim.SGD(foreach=True)
    sgd-fused          torch.optim.SGD(fused=True)            where torch has it for the device
    sngm-foreach       SNGM written with torch._foreach_* ops (benchmarks/foreach_sngm.py)
    sngm-reference     sngm_ext.SNGM(backend="reference")
    sngm-<backend>     sngm_ext.SNGM(backend=...) for each fused backend that runs here
                       (triton and cuda on a GPU, cpu on a CPU): the kernels read and write the
                       params, grads and momentum where they live, whichever tensors they are

Bytes model (bytes per param element of the params' dtype, s bytes each): what the step must move.
    SGD with momentum       read g, w, u; write w, u                               5 s
    SNGM                    phase 1 (norm) reads g, and w when weight_decay != 0;
                            phase 2 reads g, w, u and writes w, u                  7 s  (6 s without wd)
GB/s = bytes / median step time; "of copy" divides that by the bandwidth of dst.copy_(src)
on 256 MiB (GPU: 512 MiB) buffers, 2 x size bytes, timed as one more case in the same interleaved
rounds as the set (so it sees the same machine state). Extra memory: bytes of the tensors the optimizer holds
beyond the params and the grads the params point at (momentum, chunk tables, partial sums).

Results: a table on stdout (progress on stderr), and under --out (benchmarks/results/ by default)
step_<cpu|gpu>[_full][_t<threads>]_<date>.json / .png / .md plus latest_<cpu|gpu>.json / .png / .md.

Targets (TARGETS below), each reported met or not with its number, in the table's output, the MD
and the JSON ("targets"): on CPU each fused backend within 1.25x of the fastest torch SGD and 3x
faster than sngm-foreach on the model sets; on a GPU within 1.15x of fused SGD and at >= 85% of the
copy bandwidth on the model sets larger than the L2 cache, and at most 0.5x fused SGD's time on the
10,000-tensor set (fused SGD launches per ~100 tensors).

--fresh-grads adds sngm-<backend>-fresh: the same step with new grad tensors before every sample
(untimed), as autograd leaves them after zero_grad(set_to_none=True); the kernels read grads where
they lie, so this should cost nothing more. --phases times each fused backend's three ops alone
(sum of squares, finalize, update) on every set, with _foreach_copy_ of the grads as a yardstick.

--python-cost measures the steady loop's Python cost per step with the kernels stubbed, SNGM's
fused backends against torch.optim.SGD(fused=True), on ResNet-50's 161 tensors (python_cost.py);
reported in the table, the MD and the JSON ("python_cost"), with its target (at most fused SGD's).

--budget-s SECONDS caps the whole run (for a machine lent for minutes): a set that would start with
less than MIN_SET_S of it left is skipped and listed as such, each set's sampling budget shrinks to
its share of what is left, and the JSON / MD are rewritten after every set (atomically, with
"budget": {"finished": false, ...} until the end), so a run killed from outside keeps what it
measured. Without the option nothing changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from foreach_sngm import ForeachSNGM  # noqa: E402
import python_cost  # noqa: E402
from param_sets import ParamSet, by_name, parse_sets, sets_for  # noqa: E402
from report import (budget_line, format_table, python_cost_lines, save_report,  # noqa: E402
                    target_line, target_lines)
from timing import (Budget, Case, CopyProbe, Progress, Timer, cpu_name, run_interleaved,  # noqa: E402
                    summarize)

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
HYPER = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
# The reference backend keeps a full fp32 copy of the directions plus temporaries: above this many
# params it is left out on a GPU (it would not fit beside the other variants).
REFERENCE_MAX_NUMEL_GPU = 300_000_000
# --budget-s: a set is started only with at least this many seconds of the budget left; each set's
# sampling budget is at most BUDGET_SHARE of its fair share of what is left (the rest is for
# building, warm-up and the memory probes); the final write (and plot) keeps FINAL_RESERVE_S.
MIN_SET_S = 1.0
BUDGET_SHARE = 0.5
FINAL_RESERVE_S = 3.0

BYTES_MODEL = {
    "unit": "bytes per param element, s = element size of the params' dtype",
    "sgd": "5 s: read grad, param, momentum; write param, momentum",
    "sngm": "7 s (6 s when weight_decay == 0): phase 1 reads grad (+ param for weight decay); "
    "phase 2 reads grad, param, momentum and writes param, momentum",
    "copy": "dst.copy_(src): 2 x size bytes",
}

# What each fused backend should reach (the CPU claims of the native step; the GPU run's issue).
TARGETS = {
    "cpu": {"vs_best_sgd_max": 1.25, "speedup_over_foreach_min": 3.0,
            "python_cost_vs_sgd_fused_max": 1.0},
    "cuda": {"vs_sgd_fused_max": 1.15, "of_copy_min": 0.85, "count10000_vs_sgd_fused_max": 0.5,
             "python_cost_vs_sgd_fused_max": 1.0},
}
# --python-cost: the param set it runs on (the issue's measure: ResNet-50's 161 tensors) and the
# steps timed per variant and round
PYTHON_COST_SET = "resnet50"
PYTHON_COST_PER_ROUND = 200


# --------------------------------------------------------------------------------------------
# variants


@dataclass
class VariantSpec:
    name: str
    family: str  # "sgd" or "sngm"
    impl: str
    backend: Optional[str] = None  # sngm_ext backend
    fresh_grads: bool = False  # new grad tensors before every sample (untimed)

    def bytes_per_elem(self, weight_decay: float = WEIGHT_DECAY) -> int:
        return 5 if self.family == "sgd" else 6 + (weight_decay != 0)

    def bytes_model(self) -> str:
        return BYTES_MODEL[self.family]


def _sgd_fused_ok(device: torch.device) -> Optional[str]:
    """None when torch.optim.SGD(fused=True) runs on ``device``, else why not."""
    try:
        p = torch.nn.Parameter(torch.zeros(4, device=device))
        p.grad = torch.ones(4, device=device)
        torch.optim.SGD([p], fused=True, **HYPER).step()
        return None
    except (RuntimeError, ValueError) as e:
        return str(e).splitlines()[0]


def sngm_backends(device: torch.device) -> Dict[str, Optional[str]]:
    """Fused sngm_ext backends that could run on ``device``: name -> None (runs) or why not."""
    import sngm_ext

    names = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    out: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            sngm_ext.resolve_backend(name, device)
            out[name] = None
        except sngm_ext.BackendUnavailable as e:
            out[name] = str(e).splitlines()[0]
        except Exception as e:  # a broken build must not stop the benchmark
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def variant_specs(device: torch.device, fresh_grads: bool = False) -> tuple:
    """(specs that run here, {name: why not} for those left out)."""
    specs = [
        VariantSpec("sgd-forloop", "sgd", "torch.optim.SGD(foreach=False)"),
        VariantSpec("sgd-foreach", "sgd", "torch.optim.SGD(foreach=True)"),
    ]
    missing: Dict[str, str] = {}
    why = _sgd_fused_ok(device)
    if why is None:
        specs.append(VariantSpec("sgd-fused", "sgd", "torch.optim.SGD(fused=True)"))
    else:
        missing["sgd-fused"] = why
    specs.append(VariantSpec("sngm-foreach", "sngm", "benchmarks/foreach_sngm.py ForeachSNGM"))
    specs.append(VariantSpec("sngm-reference", "sngm", "sngm_ext.SNGM(backend='reference')",
                             backend="reference"))
    for name, why in sngm_backends(device).items():
        if why is not None:
            missing[f"sngm-{name}"] = why
            continue
        impl = f"sngm_ext.SNGM(backend='{name}')"
        specs.append(VariantSpec(f"sngm-{name}", "sngm", impl, backend=name))
        if fresh_grads:
            specs.append(VariantSpec(f"sngm-{name}-fresh", "sngm", impl + ", new grads every step",
                                     backend=name, fresh_grads=True))
    return specs, missing


@dataclass
class Built:
    spec: VariantSpec
    opt: torch.optim.Optimizer
    params: List[torch.Tensor]
    step: Callable[[], object]
    before: Optional[Callable[[], object]] = None  # untimed, before every sample


class Workload:
    """The tensors of one param set on one device, and the optimizers that step them.

    The grads are made once (the state after backward) and shared. Every variant steps one
    shared list of params, each optimizer with its own momentum.
    """

    def __init__(self, pset: ParamSet, device: torch.device, seed: int = 0):
        self.pset = pset
        self.device = device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.grads = [self._rand(s, gen, 1e-3) for s in pset.shapes]
        self.shared = [torch.nn.Parameter(self._rand(s, gen, 0.02)) for s in pset.shapes]
        for p, g in zip(self.shared, self.grads):
            p.grad = g

    def _rand(self, shape, gen, scale) -> torch.Tensor:
        if self.device.type == "cuda":  # fast on the device; values do not matter for timing
            t = torch.randn(shape, device=self.device, dtype=torch.float32)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float32)
        return (t * scale).to(self.pset.dtype)

    def build(self, spec: VariantSpec) -> Built:
        if spec.family == "sgd":
            kw = dict(HYPER)
            if spec.name == "sgd-forloop":
                kw["foreach"] = False
            elif spec.name == "sgd-foreach":
                kw["foreach"] = True
            else:
                kw["fused"] = True
            opt = torch.optim.SGD(self.shared, **kw)
            return Built(spec, opt, self.shared, opt.step)
        if spec.name == "sngm-foreach":
            opt = ForeachSNGM(self.shared, **HYPER)
            return Built(spec, opt, self.shared, opt.step)
        from sngm_ext import SNGM

        opt = SNGM(self.shared, backend=spec.backend, **HYPER)
        return Built(spec, opt, self.shared, opt.step,
                     self._new_grads if spec.fresh_grads else None)

    def _new_grads(self) -> None:
        """Point every param at new grad tensors (two sets taken in turn, made once: what backward
        leaves after zero_grad(set_to_none=True), without timing the allocation)."""
        if not hasattr(self, "_fresh"):
            self._fresh = [[torch.empty_like(g).copy_(g) for g in self.grads] for _ in range(2)]
            self._turn = 0
        self._turn ^= 1
        for p, g in zip(self.shared, self._fresh[self._turn]):
            p.grad = g


# --------------------------------------------------------------------------------------------
# memory held by an optimizer


def _tensors_in(obj, out: List[torch.Tensor], depth: int = 0) -> None:
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out, depth + 1)


def held_tensors(opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    """Tensors an optimizer keeps between steps (its state, and sngm_ext's chunk tables)."""
    out: List[torch.Tensor] = []
    _tensors_in(list(opt.state.values()), out)
    for attr in ("grad_norm", "_skipped"):
        _tensors_in(getattr(opt, attr, None), out)
    plans = getattr(opt, "_plans", None)
    if plans is not None:
        for plan in plans.plans.values():
            _tensors_in([getattr(plan, k, None) for k in ("chunks", "partials", "seg_ptr")], out)
    return out


def extra_bytes(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    """Bytes of storage the optimizer holds beyond the params and the grads they point at."""

    def key(t):
        return (t.device, t.untyped_storage().data_ptr())

    exclude = set()
    for p in params:
        exclude.add(key(p))
        if p.grad is not None:
            exclude.add(key(p.grad))
    seen: Dict[tuple, int] = {}
    for t in held_tensors(opt):
        k = key(t)
        if k not in exclude and k not in seen:
            seen[k] = t.untyped_storage().nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# one run


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def machine_info(device: torch.device) -> Dict[str, object]:
    import sngm_ext

    info: Dict[str, object] = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "sngm_ext": getattr(sngm_ext, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


@dataclass
class Settings:
    warmup: int
    rounds: int
    per_round: int
    min_rounds: int
    max_per_round: int
    warmup_budget_s: float  # warm-up stops after 2 steps once it took this long
    budget_s: float  # per param set: rounds are cut (not below min_rounds) to stay under it


def measure_set(pset: ParamSet, device: torch.device, specs: Sequence[VariantSpec],
                timer: Timer, settings: Settings, progress: Progress,
                probe: Optional[CopyProbe] = None,
                deadline: Optional[float] = None) -> Dict[str, object]:
    """One set's results. ``deadline`` (time.perf_counter(), --budget-s): warm-ups stop after two
    steps and rounds stop (after the first) once it has passed."""
    label = f"{pset.name}:"
    progress.update(f"{label} building {pset.numel:,} params in {pset.n_tensors} tensors", force=True)
    wl = Workload(pset, device)
    built: List[Built] = []
    skipped: Dict[str, str] = {}
    est: Dict[str, float] = {}
    for spec in specs:
        if (spec.backend == "reference" and device.type == "cuda"
                and pset.numel > REFERENCE_MAX_NUMEL_GPU):
            skipped[spec.name] = (f"left out above {REFERENCE_MAX_NUMEL_GPU:,} params on a GPU "
                                  "(memory for its fp32 temporaries)")
            continue
        try:
            b = wl.build(spec)
            progress.update(f"{label} warm-up {spec.name}")
            times = []  # the first step builds state (momentum, tables): never an estimate
            while len(times) < settings.warmup:
                if b.before is not None:
                    b.before()
                times.append(timer(b.step))
                if len(times) >= 2 and sum(times) > settings.warmup_budget_s:
                    break
                if len(times) >= 2 and deadline is not None and time.perf_counter() >= deadline:
                    break
            est[spec.name] = max(min(times[1:] or times), 1e-7)
            built.append(b)
        except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
            skipped[spec.name] = f"out of memory: {str(e).splitlines()[0]}"
            b = None
        if spec.name in skipped:
            gc.collect()
            torch.cuda.empty_cache()

    cases = [Case(b.spec.name, b.step, b.before) for b in built]
    if probe is not None:  # the copy, timed in the same rounds: the yardstick for "of copy"
        cases.append(probe.case())
        est["copy"] = max(min(timer(probe.step) for _ in range(2)), 1e-7)

    # Size the sampling to the budget from the warm-up times: fast variants get more samples per
    # round (a noisy shared CPU needs them), slow ones fewer rounds (not below min_rounds).
    per_case = settings.budget_s / max(settings.rounds * len(cases), 1)
    n_per = {k: max(1, min(settings.max_per_round, int(per_case / t)))
             for k, t in est.items()}
    round_s = sum(n_per[k] * est[k] for k in est)
    rounds = settings.rounds
    if round_s > 0:
        rounds = max(settings.min_rounds, min(rounds, int(settings.budget_s / round_s)))

    for c in cases:
        c.per_round = n_per[c.name]
    samples = run_interleaved(timer, cases, warmup=0, rounds=rounds, per_round=settings.per_round,
                              progress=progress, label=label, deadline=deadline)
    planned = rounds
    if deadline is not None and cases:  # rounds actually run (the deadline may have cut them)
        rounds = min(len(samples[c.name]) // (c.per_round or settings.per_round) for c in cases)

    rows = []
    for b in built:
        st = summarize(samples[b.spec.name])
        extra = extra_bytes(b.opt, b.params)
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            b.step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        nbytes = b.spec.bytes_per_elem() * pset.elem_size * pset.numel
        rows.append({
            "variant": b.spec.name,
            "family": b.spec.family,
            "impl": b.spec.impl,
            "backend": b.spec.backend,
            "bytes_per_elem": b.spec.bytes_per_elem() * pset.elem_size,
            "bytes_model": b.spec.bytes_model(),
            "bytes_per_step": nbytes,
            **st,
            "gbps": nbytes / st["median_s"] / 1e9,
            "extra_bytes": extra,
            "peak_step_bytes": peak,
            "samples_s": samples[b.spec.name],
        })
    copy = probe.stats(samples["copy"]) if probe is not None else None
    for r in rows:
        r["frac_copy"] = r["gbps"] / copy["gbps"] if copy else None
    sgd = [r for r in rows if r["family"] == "sgd"]
    best = min(sgd, key=lambda r: r["median_s"]) if sgd else None
    for r in rows:
        r["ratio_vs_best_sgd"] = r["median_s"] / best["median_s"] if best else None
    del built, wl
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res = {
        "name": pset.name,
        "note": pset.note,
        "kind": pset.kind,
        "numel": pset.numel,
        "n_tensors": pset.n_tensors,
        "dtype": pset.dtype_name(),
        "rounds": rounds,
        "per_round": n_per,
        "warmup": settings.warmup,
        "best_sgd": best["variant"] if best else None,
        "copy": copy,
        "variants": rows,
        "skipped": skipped,
    }
    if deadline is not None:
        res["budget_s"] = settings.budget_s
        res["rounds_planned"] = planned
    return res


def measure_phases(pset: ParamSet, device: torch.device, specs: Sequence[VariantSpec],
                   timer: Timer, rounds: int, progress: Progress,
                   deadline: Optional[float] = None) -> Dict[str, Dict[str, object]]:
    """--phases: each fused backend's three ops alone over this set's tensors (one list, the
    benchmark's hyper-parameters), and ``_foreach_copy_`` of the grads as the yardstick, timed in
    interleaved rounds. {"<backend>:<op>" or "copy_grads": stats with "gbps" (the op's bytes)}."""
    from sngm_ext.backends import resolve_backend
    from sngm_ext.layout import make_plan

    wl = Workload(pset, device)
    ps = [p.detach() for p in wl.shared]
    gs = wl.grads
    mom = [torch.zeros_like(p) for p in ps]
    dst = [torch.empty_like(g) for g in gs]
    plan = make_plan([[p.numel() for p in ps]], False, device)
    sumsq = torch.empty_like(plan.sumsq)
    s = pset.elem_size * pset.numel
    cases = [Case("copy_grads", lambda: torch._foreach_copy_(dst, gs))]
    nbytes = {"copy_grads": 2 * s}
    for spec in specs:
        if spec.backend in (None, "reference") or spec.fresh_grads:
            continue
        _, ops = resolve_backend(spec.backend, device)
        be = spec.backend
        cases += [
            Case(f"{be}:sumsq", lambda ops=ops: ops.sumsq(ps, gs, plan.chunks[0], None, WEIGHT_DECAY,
                                                          False, plan.partials, 0)),
            Case(f"{be}:finalize", lambda ops=ops: ops.finalize(plan.partials, plan.seg_ptr, None, sumsq)),
            Case(f"{be}:update", lambda ops=ops: ops.update(ps, gs, mom, plan.chunks[0], sumsq, None,
                                                            None, LR, MOMENTUM, WEIGHT_DECAY, False, False)),
        ]
        nbytes.update({f"{be}:sumsq": (1 + (WEIGHT_DECAY != 0)) * s, f"{be}:finalize": 0,
                       f"{be}:update": 5 * s})
    # warm-up in this order: the update needs a finalized sum of squares
    samples = run_interleaved(timer, cases, warmup=2, rounds=rounds, per_round=3,
                              progress=progress, label=f"{pset.name} phases:", deadline=deadline)
    out: Dict[str, Dict[str, object]] = {}
    for name, xs in samples.items():
        st: Dict[str, object] = dict(summarize(xs))
        st["bytes"] = nbytes[name]
        st["gbps"] = nbytes[name] / st["median_s"] / 1e9 if nbytes[name] else None
        out[name] = st
    return out


def _target(set_name: str, variant: str, what: str, value: float, target: float,
            at_most: bool) -> Dict[str, object]:
    x = {"set": set_name, "variant": variant, "what": what, "value": value, "target": target,
         "at_most": at_most, "met": value <= target if at_most else value >= target}
    x["line"] = target_line(x)  # the text the GPU kit's summary prints as it is
    return x


def check_targets(report: Dict[str, object]) -> List[Dict[str, object]]:
    """Each TARGETS entry that applies to a measured set and fused backend: value, target, met."""
    m = report["machine"]
    gpu = m["device"] == "cuda"
    t = TARGETS["cuda" if gpu else "cpu"]
    l2 = m.get("gpu_l2_bytes")
    out: List[Dict[str, object]] = []
    for res in report["sets"]:
        rows = {r["variant"]: r for r in res["variants"]}
        sgd_fused = rows.get("sgd-fused")
        for r in res["variants"]:
            if r["backend"] in (None, "reference") or r["variant"].endswith("-fresh"):
                continue

            def add(what, value, target, at_most):
                out.append(_target(res["name"], r["variant"], what, value, target, at_most))

            if res["kind"] == "model" and not gpu:
                add("step / fastest torch SGD", r["ratio_vs_best_sgd"], t["vs_best_sgd_max"], True)
                if "sngm-foreach" in rows:
                    add("sngm-foreach / step", rows["sngm-foreach"]["median_s"] / r["median_s"],
                        t["speedup_over_foreach_min"], False)
            if res["kind"] == "model" and gpu and l2 and r["bytes_per_step"] > l2:
                if sgd_fused:
                    add("step / fused SGD", r["median_s"] / sgd_fused["median_s"],
                        t["vs_sgd_fused_max"], True)
                if r["frac_copy"] is not None:
                    add("share of copy bandwidth", r["frac_copy"], t["of_copy_min"], False)
            if res["name"] == "count10000" and gpu and sgd_fused:
                add("step / fused SGD", r["median_s"] / sgd_fused["median_s"],
                    t["count10000_vs_sgd_fused_max"], True)
    pc = report.get("python_cost")
    for r in (pc["variants"] if pc else []):
        if r["variant"].startswith("sngm-"):
            out.append(_target(pc["set"], r["variant"], "python cost / fused SGD's",
                               r["ratio_vs_sgd_fused"], t["python_cost_vs_sgd_fused_max"], True))
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="all sets and the tensor-count / size sweeps (minutes)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results directory")
    ap.add_argument("--sets", default=None,
                    help="comma-separated sets instead of the default list: resnet20, resnet50, "
                         "gpt2, decoder1b, counts (tensor-count sweep), sizes (size sweep)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per set (max)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) first (CPU; default: torch's own choice)")
    ap.add_argument("--no-save", action="store_true", help="print the table, write no files")
    ap.add_argument("--no-plot", action="store_true", help="write the JSON and MD, no PNG")
    ap.add_argument("--fresh-grads", action="store_true",
                    help="also sngm-<backend>-fresh: new grad tensors before every step (untimed)")
    ap.add_argument("--phases", action="store_true",
                    help="also time each fused backend's three ops alone on every set")
    ap.add_argument("--python-cost", action="store_true",
                    help="also the step's Python cost with the kernels stubbed, against fused "
                         f"SGD's, on {PYTHON_COST_SET}'s tensors (python_cost.py)")
    ap.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                    help="cap the whole run: sets that would start past it are skipped (and "
                         "listed), each set's sampling shrinks to fit, and the JSON/MD are "
                         "rewritten after every set so that a kill keeps what was measured")
    args = ap.parse_args(argv)
    if args.budget_s is not None and not args.budget_s >= 0:
        ap.error("--budget-s must be >= 0")
    budget = Budget(args.budget_s) if args.budget_s is not None else None
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    device = torch.device(dev)
    if args.sets:
        try:
            psets = parse_sets(args.sets, dev)
        except ValueError as e:
            ap.error(str(e))
    else:
        psets = sets_for(dev, args.full)
    gpu = dev == "cuda"
    if args.full:
        settings = Settings(warmup=3, rounds=9, per_round=3, min_rounds=3, max_per_round=50, warmup_budget_s=3.0,
                            budget_s=30.0 if gpu else 60.0)
    else:
        settings = Settings(warmup=2, rounds=7, per_round=2, min_rounds=3, max_per_round=30, warmup_budget_s=1.0,
                            budget_s=10.0 if gpu else 20.0)
    if args.rounds:
        settings.rounds = args.rounds
        settings.min_rounds = min(settings.min_rounds, args.rounds)

    kind = "gpu" if gpu else "cpu"
    tag = ("_full" if args.full else "") + (f"_t{args.threads}" if args.threads else "")

    def base_name() -> str:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return os.path.join(args.out, f"step_{kind}{tag}_{stamp}")

    base = base_name()  # --budget-s: one name from the start, rewritten after each set

    progress = Progress()
    progress.update("checking backends", force=True)
    specs, unavailable = variant_specs(device, fresh_grads=args.fresh_grads)
    machine = machine_info(device)
    timer = Timer(device)
    probe = CopyProbe(device, (1 << 29) if gpu else (1 << 28))
    copy = probe.measure(timer, samples=10, progress=progress)
    progress.done(
        f"{machine['device_name']} ({dev}, {machine['torch_threads']} threads), torch "
        f"{machine['torch']}, triton {machine['triton']}; copy {copy['gbps']:.1f} GB/s"
        + (f"; load average {machine['load_average'][0]:.1f}" if not gpu and machine["load_average"]
           else "")
        + "; variants: "
        + ", ".join(s.name for s in specs)
        + ("; not here: " + ", ".join(unavailable) if unavailable else ""))

    results = []
    python_cost_result: Dict[str, object] = {}
    errors: Dict[str, str] = {}
    skipped_sets: Dict[str, str] = {}
    per_set_budget: Dict[str, float] = {}

    def make_report(finished: bool) -> Dict[str, object]:
        report = {
            "schema": "sngm-ext/bench_step/1",
            "machine": machine,
            "mode": "full" if args.full else "quick",
            "argv": sys.argv if argv is None else ["bench_step.py", *argv],
            "hyper": HYPER,
            "timing": {
                "cpu": "perf_counter around step(), back to back, caches not flushed",
                "cuda": "device events around step() on an idle stream after zeroing 2x L2; host "
                        "launch time counts where the GPU waits for it",
                "interleaving": "rounds x per_round samples per variant, order rotated each round",
                "warmup_steps": settings.warmup,
                "flush_bytes": timer.flush_bytes,
            },
            "bytes_model": BYTES_MODEL,
            "copy": {k: v for k, v in copy.items()},
            "unavailable": unavailable,
            "errors": errors,
            "sets": results,
            "targets_spec": TARGETS["cuda" if gpu else "cpu"],
        }
        if python_cost_result:
            report["python_cost"] = python_cost_result
        report["targets"] = check_targets(report)
        if budget is not None:
            report["budget"] = {
                "budget_s": budget.seconds,
                "finished": finished,
                "elapsed_s": budget.elapsed(),
                "sets_planned": [ps.name for ps in psets],
                "sets_done": [r["name"] for r in results],
                "skipped_sets": dict(skipped_sets),
                "per_set_budget_s": dict(per_set_budget),
                "min_set_s": MIN_SET_S,
            }
        return report

    def save_partial() -> None:  # --budget-s: what was measured so far, after every set
        if args.no_save or budget is None:
            return
        try:
            save_report(make_report(False), args.out, base, kind, with_plot=False)
        except OSError as e:
            print(f"(could not write partial results: {e})", file=sys.stderr)

    save_partial()
    for i, ps in enumerate(psets):
        set_settings, deadline = settings, None
        if budget is not None:
            left = budget.left() - min(FINAL_RESERVE_S, 0.1 * budget.seconds)
            if left < MIN_SET_S:
                skipped_sets[ps.name] = (f"not started: {max(budget.left(), 0):.1f} s of the "
                                         f"{budget.seconds:g} s budget left")
                progress.done(f"{ps.name}: skipped, {skipped_sets[ps.name]}")
                continue
            share = BUDGET_SHARE * left / (len(psets) - i)
            set_settings = dataclasses.replace(
                settings, budget_s=min(settings.budget_s, share),
                warmup_budget_s=min(settings.warmup_budget_s, 0.2 * share))
            per_set_budget[ps.name] = set_settings.budget_s
            deadline = budget.deadline
        res = None
        try:
            res = measure_set(ps, device, specs, timer, set_settings, progress, probe,
                              deadline=deadline)
        except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
            errors[ps.name] = f"out of memory: {str(e).splitlines()[0]}"
            progress.done(f"{ps.name}: left out, {errors[ps.name]}")
        if res is None:  # the traceback is gone now: its tensors can be freed
            gc.collect()
            torch.cuda.empty_cache()
            save_partial()
            continue
        if args.phases:
            try:
                res["phases"] = measure_phases(ps, device, specs, timer,
                                               max(settings.min_rounds, 3), progress,
                                               deadline=deadline)
            except Exception as e:  # the step's numbers of this set stand without them
                res["phases_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                progress.done(f"{ps.name}: phases not measured: {res['phases_error']}")
            gc.collect()  # the phases' tensors are garbage now: give the next set their memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(res)
        progress.done()
        print(format_table(res, gpu), end="\n\n", flush=True)
        save_partial()

    if args.python_cost:
        fused = [sp.backend for sp in specs
                 if sp.backend not in (None, "reference") and not sp.fresh_grads]
        try:
            if not fused:
                raise RuntimeError("no fused SNGM backend runs here: "
                                   + "; ".join(f"{k} ({v})" for k, v in unavailable.items()))
            if "sgd-fused" in unavailable:
                raise RuntimeError(f"torch.optim.SGD(fused=True): {unavailable['sgd-fused']}")
            python_cost_result.update(python_cost.measure(
                by_name(PYTHON_COST_SET), device, fused, rounds=settings.rounds,
                per_round=PYTHON_COST_PER_ROUND, progress=progress,
                deadline=budget.deadline if budget is not None else None))
            progress.done()
            print("\n".join(python_cost_lines(python_cost_result)), end="\n\n", flush=True)
        except Exception as e:  # recorded and written with the rest; the exit status says it
            errors["python-cost"] = f"{type(e).__name__}: {e}"
            progress.done(f"python cost not measured: {errors['python-cost']}")
        gc.collect()
    if hasattr(os, "getloadavg"):
        machine["load_average_end"] = list(os.getloadavg())
    report = make_report(True)
    if report["targets"]:
        print("Targets:\n" + "\n".join("  " + line for line in target_lines(report["targets"])),
              flush=True)
    if budget is not None:
        print(budget_line(report), flush=True)
    if not args.no_save:
        with_plot = not args.no_plot
        if with_plot and budget is not None and budget.left() <= 0:
            with_plot = False
            print("(plot skipped: the time budget is spent)", file=sys.stderr)
        if budget is None:  # named when written, as always
            base = base_name()
        written = save_report(report, args.out, base, kind, with_plot=with_plot)
        print("wrote " + ", ".join(os.path.relpath(p) for p in written)
              + f" (and latest_{kind}.*)")
    if "python-cost" in errors:
        raise SystemExit(f"bench_step.py --python-cost failed: {errors['python-cost']}")
    return report


if __name__ == "__main__":
    main()
