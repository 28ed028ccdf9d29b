"""The benchmarks' own correctness: the plain-PyTorch baseline they time SNGM against is SNGM (one
global norm), the parameter sets have the published counts, and the step and whole-iteration
benchmarks run end to end on a small set and write what the docs say (targets, phases, fresh grads).
Seconds; CPU only."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bounds import step_error_bounds
from kit import ROOT, assert_within, importable

BENCH = importable("benchmarks")

import python_cost  # noqa: E402
from foreach_sngm import ForeachSNGM  # noqa: E402
from param_sets import EXPECTED, ParamSet, by_name, check_counts  # noqa: E402

import sngm_ext  # noqa: E402
from sngm_ext import SNGM  # noqa: E402


def _groups(params, cfgs):
    return [dict(params=params[i::len(cfgs)], **cfg) for i, cfg in enumerate(cfgs)]


@pytest.mark.parametrize("cfgs", [
    [dict(weight_decay=0.0)],
    [dict(weight_decay=1e-2), dict(weight_decay=0.0, nesterov=True)],
    [dict(weight_decay=1e-3, maximize=True), dict(momentum=0.0, lr=0.3)],
], ids=["plain", "wd+nesterov", "maximize+no-momentum"])
def test_foreach_baseline_is_sngm(cfgs):
    """ForeachSNGM (what bench_step calls sngm-foreach) against the reference backend, fp64 so
    that rounding is out of the way: a per-tensor or per-group norm would be off by O(1). Each
    step starts both from the reference's params and momentum (ForeachSNGM rounds its own
    operations, _foreach_norm's per-tensor norms among them: the two agree to the bounds of one
    step each, not bit for bit, and the comparison must not carry a difference on)."""
    gen = torch.Generator().manual_seed(0)
    # scales 1e-3..10 apart: a per-tensor norm would change every direction's length
    shapes = [(7, 3), (5,), (4, 2, 3), (11,)]
    scales = [1e-3, 1.0, 10.0, 0.1]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    mine = [torch.nn.Parameter(t.clone()) for t in init]
    hyper = dict(lr=0.1, momentum=0.9)
    o_ref = SNGM(_groups(ref, cfgs), backend="reference", **hyper)
    o_mine = ForeachSNGM(_groups(mine, cfgs), **hyper)
    # each param's group settings, in the order of ``ref``
    group_of = {id(p): dict(o_ref.defaults, **{k: v for k, v in g.items() if k != "params"})
                for g in o_ref.param_groups for p in g["params"]}
    for step in range(4):
        for a, b, s, c in zip(ref, mine, shapes, scales):
            g = torch.randn(s, generator=gen, dtype=torch.float64) * c
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            ref[1].grad = mine[1].grad = None  # a param without a grad this step
        live = [(a, b, group_of[id(a)]) for a, b in zip(ref, mine) if a.grad is not None]
        with torch.no_grad():  # the same state in both before the step
            for a, b, _ in live:
                b.copy_(a)
                if a in o_ref.state and b in o_mine.state:
                    o_mine.state[b]["momentum_buffer"].copy_(o_ref.state[a]["momentum_buffer"])
        ws = [a.detach().clone() for a, _, _ in live]
        ds = [(-a.grad if h["maximize"] else a.grad) + h["weight_decay"] * a.detach()
              for a, _, h in live]
        us = [o_ref.state[a]["momentum_buffer"].clone() if "momentum_buffer" in o_ref.state[a]
              else torch.zeros_like(a) for a, _, _ in live]
        # one fp64 step each, from the same values: both within step_error_bounds' one-side
        # bound of the exact step (ForeachSNGM's ops round no more often: _foreach_norm's norms
        # of norms stay within the sum's gamma_N), and its fp64 two sides are those two
        hs = {k: [h[k] for _, _, h in live] for k in ("lr", "momentum", "weight_decay", "nesterov")}
        bound = step_error_bounds(
            torch.float64, lr=hs["lr"], beta=hs["momentum"], wd=hs["weight_decay"],
            nesterov=hs["nesterov"], ws=ws, ds=ds, us=us,
            n=torch.sqrt(sum(d.square().sum() for d in ds)).item())
        o_ref.step()
        o_mine.step()
        torch.testing.assert_close(o_mine.grad_norm.double(), o_ref.grad_norm, atol=0,
                                   rtol=bound.norm_rtol)
        for i, (a, b, h) in enumerate(live):
            assert_within(b, a, bound.params[i], f"step {step}: param {i}")
            if h["momentum"]:
                assert_within(o_mine.state[b]["momentum_buffer"], o_ref.state[a]["momentum_buffer"],
                              bound.momentum[i], f"step {step}: momentum {i}")


def test_param_sets_have_published_counts():
    check_counts()
    assert set(EXPECTED) == {"resnet20", "resnet50", "gpt2", "decoder1b"}
    assert by_name("decoder1b").dtype == torch.bfloat16


SMALL = ParamSet("small", ((40, 24), (5000,), (3,)))


def test_python_cost_times_the_steps_with_their_kernels_stubbed():
    """Each variant's stubs saw every step (one call per op and step), nothing was written, and
    both medians are real host times."""
    res = python_cost.measure(SMALL, torch.device("cpu"), ["cpu"], rounds=2, per_round=5)
    rows = {r["variant"]: r for r in res["variants"]}
    assert set(rows) == {"sgd-fused", "sngm-cpu"}
    assert rows["sgd-fused"]["stub_calls_per_step"] == {"torch._fused_sgd_": 1.0}
    assert rows["sngm-cpu"]["stub_calls_per_step"] == {
        f"FusedOps.{op}": 1.0 for op in ("sumsq", "finalize", "update")}
    for r in rows.values():
        assert r["n"] == 10 and 0 < r["median_s"] < 0.1
    # the same division of the same floats: the same bits
    assert rows["sngm-cpu"]["ratio_vs_sgd_fused"] == \
        rows["sngm-cpu"]["median_s"] / rows["sgd-fused"]["median_s"]
    assert not hasattr(torch._fused_sgd_, "calls")  # the real op is back


def test_python_cost_refuses_to_time_a_step_its_stubs_missed(monkeypatch):
    """Where the step does not call the ops it stubbed (here: resolve_backend hands the benchmark
    other ops than the step's), the real kernels run: the measurement fails, naming why."""
    real = sngm_ext.resolve_backend
    monkeypatch.setattr(sngm_ext, "resolve_backend",
                        lambda *a, **k: (real(*a, **k)[0], type(real(*a, **k)[1])("sngm_native")))
    with pytest.raises(RuntimeError, match="no longer calls what is stubbed"):
        python_cost.measure(SMALL, torch.device("cpu"), ["cpu"], rounds=1, per_round=2)


def _run(args, timeout=240):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU backends only; the interpreter would take minutes
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_bench_step_end_to_end(tmp_path):
    p = _run([os.path.join(BENCH, "bench_step.py"), "--sets", "resnet20", "--rounds", "1",
              "--threads", "1", "--fresh-grads", "--phases", "--python-cost", "--no-plot",
              "--out", str(tmp_path)])
    rep = json.loads((tmp_path / "latest_cpu.json").read_text())
    (res,) = rep["sets"]
    names = [r["variant"] for r in res["variants"]]
    assert {"sgd-fused", "sngm-foreach", "sngm-reference", "sngm-cpu", "sngm-cpu-fresh"} <= set(names)
    for r in res["variants"]:
        assert r["median_s"] > 0 and r["gbps"] > 0 and r["ratio_vs_best_sgd"] > 0
    # every fused backend's ops alone, with the copy of the grads as the yardstick
    assert {"copy_grads", "cpu:sumsq", "cpu:finalize", "cpu:update"} <= set(res["phases"])
    # both CPU targets reported for the fused backend, met or not, with the value behind it
    targets = {(t["variant"], t["what"]): t for t in rep["targets"]}
    assert set(targets) == {("sngm-cpu", "step / fastest torch SGD"),
                            ("sngm-cpu", "sngm-foreach / step"),
                            ("sngm-cpu", "python cost / fused SGD's")}
    row = {r["variant"]: r for r in res["variants"]}
    t = targets[("sngm-cpu", "sngm-foreach / step")]
    # the same division of the same floats (JSON round-trips them): the same bits
    assert t["value"] == row["sngm-foreach"]["median_s"] / row["sngm-cpu"]["median_s"]
    assert t["met"] == (t["value"] >= 3.0)
    assert t["line"].startswith("resnet20 sngm-cpu: sngm-foreach / step ")  # what the GPU kit prints
    assert t["line"].endswith(": met" if t["met"] else ": MISSED")
    # --python-cost: ResNet-50's 161 tensors, both variants, the ratio the target reads
    pc = rep["python_cost"]
    assert (pc["set"], pc["n_tensors"]) == ("resnet50", 161)
    cost = {r["variant"]: r for r in pc["variants"]}
    assert set(cost) == {"sgd-fused", "sngm-cpu"} and cost["sgd-fused"]["n"] == 200
    t = targets[("sngm-cpu", "python cost / fused SGD's")]
    assert t["value"] == cost["sngm-cpu"]["ratio_vs_sgd_fused"] and t["target"] == 1.0
    md = (tmp_path / "latest_cpu.md").read_text()
    assert "**Targets**" in md and "phases alone" in md and "Python cost per step" in md
    assert "Targets:" in p.stdout


def test_bench_iteration_end_to_end(tmp_path):
    out = tmp_path / "hooks.json"
    _run([os.path.join(BENCH, "bench_iteration.py"), "--width", "64", "--layers", "2",
          "--batch", "4", "--rounds", "2", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["variants"]
    assert set(rows) == {"sgd fused", "sgd foreach", "sngm foreach", "sngm", "sngm norm in backward"}
    assert all(r["whole_ms"] > 0 for r in rows.values())
