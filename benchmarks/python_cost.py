"""The Python cost of one optimizer step in a steady loop: everything but the kernels.

SNGM and ``torch.optim.SGD(fused=True)`` step the same params (ResNet-50's 161 tensors by default)
with their kernels replaced by no-ops, and the host time of each ``step()`` is what is left: the
optimizer's own Python (collecting the tensors, checks, caches, launching its small ops). Written
against public seams only, so that it measures whatever the step becomes:

* SNGM: the three ops of its fused backend, ``sumsq``, ``finalize`` and ``update`` of the object
  ``sngm_ext.resolve_backend(backend, device)`` hands out, replaced by no-ops; the step is
  ``SNGM(params, backend=backend).step()``.
* SGD: ``torch._fused_sgd_`` (what ``torch.optim.SGD(fused=True)`` calls per device and dtype)
  replaced by a no-op.

Each stub counts its calls and the params are compared before and after: a step that did not go
through a stub (its kernels ran) makes the measurement fail, never report a number.

Timing: host wall time (``time.perf_counter``) around each ``step()``, in interleaved rounds
(timing.py), medians over all steps; no device sync inside a sample (on a GPU the step's own small
launches count as their host cost, as they do in a training loop).

    python benchmarks/python_cost.py [--device cpu|cuda] [--set resnet50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from param_sets import ParamSet, by_name  # noqa: E402
from timing import Case, Progress, Timer, run_interleaved, summarize  # noqa: E402

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
SNGM_OPS = ("sumsq", "finalize", "update")
WARMUP_STEPS = 20  # the first step builds state (momentum buffers, tables); then steady


class _Stub:
    """A no-op in place of ``owner.<name>``, counting its calls; restored on exit."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.calls = owner, name, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1

    @contextlib.contextmanager
    def installed(self):
        real = getattr(self.owner, self.name)
        setattr(self.owner, self.name, self)
        try:
            yield self
        finally:
            setattr(self.owner, self.name, real)


def _variants(params: List[torch.Tensor], device: torch.device, backends: Sequence[str]):
    """(name, impl, make the optimizer, the stubs that replace its kernels) per variant."""
    import sngm_ext
    from sngm_ext import SNGM

    out = [("sgd-fused", "torch.optim.SGD(fused=True), torch._fused_sgd_ stubbed",
            lambda: torch.optim.SGD(params, fused=True, **HYPER), [_Stub(torch, "_fused_sgd_")])]
    for backend in backends:
        _, ops = sngm_ext.resolve_backend(backend, device)
        if ops is None:
            raise ValueError(f"backend {backend!r} has no fused ops to stub")
        out.append((f"sngm-{backend}",
                    f"sngm_ext.SNGM(backend='{backend}'), its ops {', '.join(SNGM_OPS)} stubbed",
                    lambda backend=backend: SNGM(params, backend=backend, **HYPER),
                    [_Stub(ops, name) for name in SNGM_OPS]))
    return out


def measure(pset: ParamSet, device: torch.device, backends: Sequence[str], rounds: int = 7,
            per_round: int = 200, progress: Optional[Progress] = None,
            deadline: Optional[float] = None) -> Dict[str, object]:
    """The per-step host time of each variant with its kernels stubbed (see the module doc)."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=pset.dtype, device=device))
              for s in pset.shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    timer = Timer(torch.device("cpu"))  # host time, whatever the device
    rows = []
    with contextlib.ExitStack() as stack:
        cases, stubs_of, impls = [], {}, {}
        for name, impl, make, stubs in _variants(params, device, backends):
            for stub in stubs:
                stack.enter_context(stub.installed())
            opt = make()
            cases.append(Case(name, opt.step))
            stubs_of[name], impls[name] = stubs, impl
        samples = run_interleaved(timer, cases, warmup=WARMUP_STEPS, rounds=rounds,
                                  per_round=per_round, progress=progress,
                                  label=f"{pset.name} python cost:", deadline=deadline)
    for c in cases:
        steps = WARMUP_STEPS + len(samples[c.name])
        calls = {f"{s.owner.__name__ if s.owner is torch else type(s.owner).__name__}.{s.name}":
                 s.calls for s in stubs_of[c.name]}
        if not all(n >= steps for n in calls.values()):
            raise RuntimeError(
                f"python cost: {c.name} made {steps} steps but its stubs saw {calls}: the step no "
                "longer calls what is stubbed (its kernels would be timed); update "
                "benchmarks/python_cost.py")
        rows.append({"variant": c.name, "impl": impls[c.name],
                     "stub_calls_per_step": {k: v / steps for k, v in calls.items()},
                     **summarize(samples[c.name])})
    if not all(torch.equal(p.detach(), b) for p, b in zip(params, before)):
        raise RuntimeError("python cost: a param changed, so a kernel ran despite its stub")
    sgd = next(r for r in rows if r["variant"] == "sgd-fused")
    for r in rows:
        r["ratio_vs_sgd_fused"] = r["median_s"] / sgd["median_s"]
    return {"set": pset.name, "n_tensors": pset.n_tensors, "numel": pset.numel,
            "dtype": pset.dtype_name(), "device": str(device), "hyper": HYPER,
            "warmup_steps": WARMUP_STEPS, "rounds": rounds, "per_round": per_round,
            "timing": "host perf_counter around step(), kernels stubbed, interleaved rounds",
            "variants": rows}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", default="resnet50", help="a param set of param_sets.py")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = ["triton", "cuda"] if device.type == "cuda" else ["cpu"]
    res = measure(by_name(args.set), device, backends, rounds=args.rounds)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
