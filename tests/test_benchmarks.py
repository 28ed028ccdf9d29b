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

from kit import ROOT, importable

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
    that rounding is out of the way: a per-tensor or per-group norm would be off by O(1)."""
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
    for step in range(4):
        for a, b, s, c in zip(ref, mine, shapes, scales):
            g = torch.randn(s, generator=gen, dtype=torch.float64) * c
            a.grad, b.grad = g.clone(), g.clone()
        if step == 2:
            ref[1].grad = mine[1].grad = None  # a param without a grad this step
        o_ref.step()
        o_mine.step()
        torch.testing.assert_close(o_mine.grad_norm.double(), o_ref.grad_norm, rtol=1e-13, atol=0)
        for a, b in zip(ref, mine):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    for grp_ref, grp in zip(o_ref.param_groups, o_mine.param_groups):
        if grp["momentum"] == 0:
            continue
        for a, b in zip(grp_ref["params"], grp["params"]):
            torch.testing.assert_close(o_mine.state[b]["momentum_buffer"],
                                       o_ref.state[a]["momentum_buffer"], rtol=1e-12, atol=1e-15)


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
    assert rows["sngm-cpu"]["ratio_vs_sgd_fused"] == pytest.approx(
        rows["sngm-cpu"]["median_s"] / rows["sgd-fused"]["median_s"])
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
    assert t["value"] == pytest.approx(row["sngm-foreach"]["median_s"] / row["sngm-cpu"]["median_s"])
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
