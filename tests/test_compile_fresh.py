"""torch.compile as users run it, each set-up in a fresh process (tests/compile_cases.py): the
first compiled call of a process, after eager steps, after load_state_dict, with a CPU tensor lr,
with norm_in_backward; every one bitwise the eager run in params, momentum, each step's
grad_norm and skipped_steps. Under the schedulers users run, no more graphs than
torch.optim.SGD compiles in the same loop (Dynamo's own counters)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import sngm_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def run_case(case, backend, compiler="aot_eager"):
    """The JSON lines the case printed in a process of its own."""
    env = dict(os.environ, SNGM_COMPILE_BACKEND=compiler, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, os.path.join(HERE, "compile_cases.py"), case, backend],
                         capture_output=True, text=True, timeout=900, env=env)
    lines = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return lines


def usable(backend):
    try:
        sngm_ext.resolve_backend(backend, torch.device("cpu"))
    except sngm_ext.BackendUnavailable as e:
        if os.environ.get("CI") and backend == "cpu":
            raise
        pytest.skip(str(e))


@pytest.mark.parametrize("case, backend, compiler", [
    ("fresh", "cpu", "aot_eager"), ("fresh", "triton", "aot_eager"),
    ("fresh", "reference", "aot_eager"), ("fresh", "cpu", "inductor"),
    ("after_eager", "cpu", "aot_eager"), ("after_eager", "triton", "aot_eager"),
    ("resumed", "cpu", "aot_eager"), ("cpu_tensor_lr", "cpu", "aot_eager"),
    ("norm_in_backward", "cpu", "aot_eager"), ("fp64_huge_grads", "cpu", "aot_eager"),
])
def test_compiled_step_is_the_eager_step(case, backend, compiler):
    usable(backend)
    r = run_case(case, backend, compiler)[0]
    assert r["params"] and r["momentum"] and r["grad_norm"] and r["skipped"], r
    # fullgraph=True: no graph break at all; 2 graphs at most (the first step makes the
    # momentum buffers, later ones read them), as torch.optim.SGD.
    assert r["graphs"] <= 2, r


def test_schedulers_compile_no_more_graphs_than_sgd():
    """OneCycleLR and CyclicLR cycle momentum as well as lr; a float reaching a custom op is a
    guard, so these are the cases that recompiled at every step (until recompile_limit)."""
    rows = {r["case"]: r for r in run_case("schedulers", "cpu")}
    for case, r in rows.items():
        if case.endswith("_sgd"):
            continue
        sgd = rows[case + "_sgd"]
        assert r["params"] and r["momentum"] and r["grad_norm"] and r["skipped"], r
        assert r["graphs"] <= sgd["graphs"], (r, sgd)
