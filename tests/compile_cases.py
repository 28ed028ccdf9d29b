"""``python tests/compile_cases.py CASE BACKEND``: one torch.compile set-up as a user runs it, in a
process of its own (test_compile_fresh.py starts one per case, so no case is warmed up by
another: the first compiled call of the process is the case's own). ``schedulers`` runs every
scheduler case, for SNGM and torch.optim.SGD, each after ``torch._dynamo.reset()``.

Each case trains a tiny model with ``torch.compile(...)`` around the step and again eagerly,
and prints one JSON line: whether params, momentum buffers, every step's ``grad_norm`` and
``skipped_steps`` are bitwise the eager ones, and Dynamo's counters (graphs, frames).
"""

import json
import os
import sys

import torch
from torch._dynamo.utils import counters

from sngm_ext import SNGM

SCHEDULERS = {
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=40),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.5, step_size_up=3,
                                                          cycle_momentum=True),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
}


# aot_eager traces exactly what inductor is handed (Dynamo + AOTAutograd) without inductor's
# minutes of C++ codegen on 2 cores; SNGM_COMPILE_BACKEND=inductor runs a case through inductor.
COMPILER = os.environ.get("SNGM_COMPILE_BACKEND", "aot_eager")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def loss(m, t, exp=0):
    """exp: the loss (and so every grad) times 2^exp."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(8, 6, generator=g).to(m[0].weight.dtype)
    return m(x).square().sum() * 2.0 ** exp


def make_opt(kind, m, lr, backend, **kw):
    if kind == "sgd":
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-2)
    return SNGM(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-2, backend=backend, **kw)


def train(compiled, *, backend, kind="sngm", lr=0.1, steps=4, eager_first=0, sched=None,
          resume=False, dtype=torch.float32, exp=0, **kw):
    """(model, optimizer, per-step grad_norm clones) after ``steps`` steps; ``dtype`` the
    model's, ``exp`` its grads' scale 2^exp."""
    m = model().to(dtype)
    make_lr = (lambda: torch.tensor(lr)) if lr == "tensor" else (lambda: lr)
    if lr == "tensor":
        lr = 0.1
    opt = make_opt(kind, m, make_lr(), backend, **kw)
    if resume:  # a resumed run: two eager steps of another optimizer, loaded into this one
        other = make_opt(kind, m, make_lr(), backend, **kw)
        for t in range(2):
            other.zero_grad()
            loss(m, 100 + t).backward()
            other.step()
        opt.load_state_dict(other.state_dict())
    scheduler = SCHEDULERS[sched](opt) if sched else None

    def step():
        opt.step()

    # With a scheduler, opt.step is its wrapper (torch/optim/lr_scheduler.py, which Dynamo
    # skips): users compile a function that calls it, as torch's tutorial does.
    run = torch.compile(step if sched else opt.step, backend=COMPILER,
                        fullgraph=sched is None) if compiled else opt.step
    norms = []
    for t in range(steps):
        opt.zero_grad()
        loss(m, t, exp).backward()
        (opt.step if t < eager_first else run)()
        if kind == "sngm":
            norms.append(opt.grad_norm.clone())
        if scheduler is not None:
            scheduler.step()
    return m, opt, norms


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def main(case, backend):
    if case == "schedulers":  # every scheduler x lr kind, SNGM and SGD, each after a reset
        for name in SCHEDULERS:
            for lr in ("tensor", "float"):
                for suffix in ("", "_sgd"):
                    torch._dynamo.reset()
                    main(f"sched_{name}_{lr}{suffix}", backend)
        return
    kw = {}
    if case == "fresh":
        kw = dict(fresh=True)
    elif case == "after_eager":
        kw = dict(eager_first=2)
    elif case == "resumed":
        kw = dict(resume=True)
    elif case == "cpu_tensor_lr":
        kw = dict(lr="tensor")
    elif case == "norm_in_backward":
        kw = dict(norm_in_backward=True)
    elif case == "fp64_huge_grads":  # beyond where an fp64 square fits: the scaled sums
        kw = dict(dtype=torch.float64, exp=700)
    elif case.startswith("sched_"):  # sched_<name>_<float|tensor>[_sgd]
        parts = case.split("_")
        kw = dict(sched=parts[1], lr="tensor" if parts[2] == "tensor" else 0.1, steps=12)
        if len(parts) > 3:
            kw["kind"] = "sgd"
    kw.pop("fresh", None)
    counters.clear()
    mc, oc, nc = train(True, backend=backend, **kw)
    stats = {"graphs": counters["stats"].get("unique_graphs", 0),
             "frames": dict(counters["frames"])}
    me, oe, ne = train(False, backend=backend, **kw)
    params_c, params_e = list(mc.parameters()), list(me.parameters())
    bufs = lambda o, ps: [o.state[p]["momentum_buffer"] for p in ps]  # noqa: E731
    out = dict(
        case=case, backend=backend, **stats,
        params=same(params_c, params_e),
        momentum=same(bufs(oc, params_c), bufs(oe, params_e)),
    )
    if kw.get("kind") != "sgd":
        out.update(grad_norm=same(nc, ne) and len(nc) == len(ne),
                   skipped=torch.equal(oc.skipped_steps, oe.skipped_steps))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
