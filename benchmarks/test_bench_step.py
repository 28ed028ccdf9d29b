"""The step benchmark's cases as pytest-benchmark tests.

    pytest benchmarks --benchmark-only                              # run and print the table
    pytest benchmarks --benchmark-only --benchmark-autosave         # keep the run (.benchmarks/)
    pytest benchmarks --benchmark-only --benchmark-compare          # compare with the last kept run

One benchmark per (param set, variant), grouped by param set; each round is one optimizer step,
timed with the GPU synchronized inside the timed function (on a GPU an L2-sized buffer is zeroed
before each round, untimed). ``extra_info`` carries the bytes the step must move (bench_step.py's
bytes model) and the achieved GB/s. The first test checks that the plain-PyTorch foreach SNGM and
every fused backend agree with sngm_ext's reference backend on a small set.
"""

from __future__ import annotations

import gc

import pytest
import torch

from bench_step import HYPER, Workload, variant_specs
from foreach_sngm import ForeachSNGM
from param_sets import by_name
from timing import Timer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
SETS = ["resnet20", "resnet50"] + (["gpt2"] if CUDA else [])
ROUNDS = {"resnet20": 50, "resnet50": 10, "gpt2": 20}
SPECS, UNAVAILABLE = variant_specs(DEVICE)
CASES = [(s, spec) for s in SETS for spec in SPECS]  # set-major: one workload alive at a time

_current: dict = {}


def _workload(name: str) -> dict:
    if _current.get("name") != name:
        _current.clear()
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        _current.update(name=name, wl=Workload(by_name(name), DEVICE), built={})
    return _current


def _sync():
    if CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize(
    "name", ["sngm-foreach"] + [s.name for s in SPECS if s.backend not in (None, "reference")]
)
def test_agrees_with_reference(benchmark, name):
    from sngm_ext import SNGM

    shapes = [(64, 3, 3, 3), (64,), (1000,), (10, 64), (10,)]

    def run():
        gen = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=gen) for s in shapes]
        ref = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]
        mine = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]
        o_ref = SNGM(ref, backend="reference", **HYPER)
        if name == "sngm-foreach":
            o_mine = ForeachSNGM(mine, **HYPER)
        else:
            o_mine = SNGM(mine, backend=name.split("-", 1)[1], **HYPER)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
            for p, q, g in zip(ref, mine, grads):
                p.grad, q.grad = g.clone(), g.clone()
            o_ref.step()
            o_mine.step()
        _sync()
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(mine, ref))
        return err, (o_mine.grad_norm - o_ref.grad_norm).abs().item() / o_ref.grad_norm.item()

    err, norm_err = benchmark.pedantic(run, rounds=1, iterations=1)
    assert err < 1e-5 and norm_err < 1e-5


@pytest.mark.parametrize("set_name,spec", CASES, ids=[f"{s}-{spec.name}" for s, spec in CASES])
def test_step(benchmark, set_name, spec):
    cur = _workload(set_name)
    wl: Workload = cur["wl"]
    b = wl.build(spec)
    timer = Timer(DEVICE)

    def setup():
        timer.flush()
        _sync()

    def step():
        b.step()
        _sync()

    benchmark.group = f"{set_name} ({wl.pset.numel:,} params, {wl.pset.n_tensors} tensors, {DEVICE.type})"
    nbytes = spec.bytes_per_elem() * wl.pset.elem_size * wl.pset.numel
    benchmark.extra_info.update(
        device=DEVICE.type, numel=wl.pset.numel, n_tensors=wl.pset.n_tensors,
        bytes_per_step=nbytes, bytes_model=spec.bytes_model(), impl=spec.impl,
    )
    benchmark.pedantic(step, setup=setup, rounds=ROUNDS[set_name], iterations=1, warmup_rounds=2)
    try:
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
    except AttributeError:  # --benchmark-disable: no stats
        pass
