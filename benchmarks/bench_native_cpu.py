#!/usr/bin/env python3
"""The speed claims of issue #3: SNGM's fused native step on ResNet-50's params vs torch.optim.SGD.

ResNet-50's parameter set (161 tensors, 25,557,032 fp32 params; shapes written out from
torchvision's resnet50, which does not import beside torch 2.13 CPU), momentum 0.9, one process,
``--threads`` intra-op threads. Every variant owns its own copy of the params and runs in turn,
round after round, so all of them see the same machine state; the figure is the median step time.

Variants:
    sngm_cpu            SNGM(backend="cpu"), the same grad tensors every step (zero_grad with
                        set_to_none=False)
    sngm_cpu_fresh      the same with a fresh grad tensor per param each step (autograd's default
                        zero_grad(set_to_none=True)): the kernels read them where they lie, so this
                        should cost nothing more
    sgd_forloop / sgd_foreach / sgd_fused
                        torch.optim.SGD(momentum=0.9) with foreach=False / foreach=True / fused=True
    sngm_foreach        SNGM in plain PyTorch _foreach ops (per-tensor norms, one global norm,
                        momentum, update; no skip of non-finite steps, so it does less than SNGM)

Prints a table and the two ratios of the claim (fused step / best SGD <= 1.25, foreach SNGM /
fused step >= 3); ``--json FILE`` writes everything.

``--device cuda`` (where there is a GPU) measures the GPU claim instead: backend="cuda" against
SGD(fused=True) (<= 1.1x) and the share of copy bandwidth the step reaches (> 85%; the step moves
24 B/param with weight decay 0: the sum of squares reads g; the update reads w, g, u, writes w, u).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def resnet50_shapes():
    """torchvision.models.resnet50()'s parameters, in .parameters() order."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:  # downsample: 1x1 conv + bn
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


DEVICE = torch.device("cpu")


def make_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.01).to(DEVICE)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(DEVICE)
    return ps


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class ForeachSNGM:
    """SNGM with torch._foreach ops only: the plain-PyTorch baseline."""

    def __init__(self, params, lr, momentum, weight_decay=0.0):
        self.params, self.lr, self.momentum, self.wd = list(params), lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        ps = [p.detach() for p in self.params]
        grads = [p.grad for p in self.params]
        d = torch._foreach_add(grads, ps, alpha=self.wd) if self.wd else grads
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(d)))
        inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
        torch._foreach_mul_(self.bufs, self.momentum)
        torch._foreach_add_(self.bufs, torch._foreach_mul(d, inv))
        torch._foreach_add_(ps, self.bufs, alpha=-self.lr)


def build_variants(shapes, args):
    from sngm_ext import SNGM

    lr, mom, wd = 0.1, 0.9, args.weight_decay
    variants = {}

    be = DEVICE.type
    ps = make_params(shapes)
    opt = SNGM(ps, lr=lr, momentum=mom, weight_decay=wd, backend=be)
    variants[f"sngm_{be}"] = (opt.step, None)

    ps_f = make_params(shapes)
    opt_f = SNGM(ps_f, lr=lr, momentum=mom, weight_decay=wd, backend=be)
    fresh = [[torch.randn(s, device=DEVICE) * 1e-3 for s in shapes] for _ in range(2)]
    turn = [0]

    def new_grads():  # outside the timed region: what backward would have allocated
        turn[0] ^= 1
        for p, g in zip(ps_f, fresh[turn[0]]):
            p.grad = g

    variants[f"sngm_{be}_fresh"] = (opt_f.step, new_grads)

    for name, kw in [("sgd_forloop", dict(foreach=False)), ("sgd_foreach", dict(foreach=True)),
                     ("sgd_fused", dict(fused=True))]:
        if name == "sgd_forloop" and DEVICE.type == "cuda" and not args.all:
            continue
        p2 = make_params(shapes)
        try:
            o = torch.optim.SGD(p2, lr=lr, momentum=mom, weight_decay=wd, **kw)
            o.step()
        except (RuntimeError, ValueError) as e:
            print(f"# {name} does not run here: {e}", file=sys.stderr)
            continue
        variants[name] = (o.step, None)

    p3 = make_params(shapes)
    variants["sngm_foreach"] = (ForeachSNGM(p3, lr, mom, wd).step, None)
    return variants


def measure(variants, rounds, steps, warmup):
    times = {k: [] for k in variants}
    for fn, prep in variants.values():
        for _ in range(warmup):
            if prep:
                prep()
            fn()
    sync()
    for _ in range(rounds):
        for name, (fn, prep) in variants.items():
            for _ in range(steps):
                if prep:
                    prep()
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    return times


def phases(shapes, rounds):
    """The native step's three ops alone over the params' tensor lists (ms, medians)."""
    from sngm_ext import native
    from sngm_ext.layout import make_plan

    ops = native.load_ops(DEVICE.type)
    ps = make_params(shapes)
    gs = [torch.randn_like(p) for p in ps]
    mom = [torch.zeros_like(p) for p in ps]
    plan = make_plan([[p.numel() for p in ps]], False, DEVICE)
    sumsq = torch.empty(1, dtype=torch.float64, device=DEVICE)
    fns = {
        "sumsq": lambda: ops.sumsq(ps, gs, plan.chunks[0], None, 0.0, False, plan.partials, 0),
        "finalize": lambda: ops.finalize(plan.partials, plan.seg_ptr, None, sumsq),
        "update": lambda: ops.update(ps, gs, mom, plan.chunks[0], sumsq, None, None, 1e-3, 0.9, 0.0,
                                     False, False),
        "copy_grad": lambda: torch._foreach_copy_(gs, mom),
    }
    t = measure({k: (f, None) for k, f in fns.items()}, rounds, 3, 2)
    return {k: statistics.median(v) * 1e3 for k, v in t.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--phases", action="store_true", help="also time the three ops alone")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--all", action="store_true", help="on CUDA also the for-loop SGD")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    shapes = resnet50_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    assert len(shapes) == 161 and n == 25_557_032, (len(shapes), n)

    from sngm_ext import native

    variants = build_variants(shapes, args)
    times = measure(variants, args.rounds, args.steps, args.warmup)
    loaded = native.info().get(DEVICE.type, {})
    fast = f"sngm_{DEVICE.type}"
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    q = {k: (statistics.quantiles(v, n=4)[0] * 1e3, statistics.quantiles(v, n=4)[2] * 1e3)
         for k, v in times.items()}

    sgd = {k: v for k, v in med.items() if k.startswith("sgd_")}
    best_sgd = min(sgd, key=sgd.get)
    ratio_sgd = med[fast] / sgd[best_sgd]
    speedup = med["sngm_foreach"] / med[fast]
    best_sgd_min = min((k for k in best if k.startswith("sgd_")), key=best.get)
    ratio_sgd_min = best[fast] / best[best_sgd_min]
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# ResNet-50 params: {len(shapes)} tensors, {n:,} fp32; momentum 0.9, weight decay "
          f"{args.weight_decay}; {args.threads} threads; torch {torch.__version__}; {cpu_model}; "
          f"native: {loaded.get('how')} {loaded.get('capability')}; "
          f"{args.rounds}x{args.steps} steps per variant, interleaved")
    print(f"{'variant':<16} {'median ms':>10} {'p25':>8} {'p75':>8} {'min':>8} {'GB/s*':>7}")
    for k in med:
        gbs = n * 20 / (med[k] * 1e-3) / 1e9  # 20 B/param: read w, g, u; write w, u
        print(f"{k:<16} {med[k]:>10.2f} {q[k][0]:>8.2f} {q[k][1]:>8.2f} {best[k]:>8.2f} "
              f"{gbs:>7.1f}")
    print("* 20 B/param over the median time: the bytes an SGD step must move")
    claim = "1.25" if DEVICE.type == "cpu" else "1.1"
    print(f"{fast} / best SGD ({best_sgd}) = {ratio_sgd:.2f}  (claim: <= {claim}); on the "
          f"fastest steps: {ratio_sgd_min:.2f} (vs {best_sgd_min})")
    print(f"sngm_foreach / {fast} = {speedup:.2f}  (claim on CPU: >= 3)")
    print(f"fresh grads cost {med[fast + '_fresh'] - med[fast]:+.2f} ms per step "
          f"(read where they lie: nothing is copied)")
    result = {"medians_ms": med, "quartiles_ms": q, "min_ms": best, "best_sgd": best_sgd,
              "sngm_over_best_sgd_min": ratio_sgd_min,
              "sngm_over_best_sgd": ratio_sgd, "foreach_sngm_over_sngm": speedup,
              "threads": args.threads, "weight_decay": args.weight_decay,
              "torch": torch.__version__, "cpu": cpu_model, "native": {
                  k: v for k, v in loaded.items() if k in ("how", "capability", "path")}}
    if DEVICE.type == "cuda":
        src = torch.randn(n, device=DEVICE)
        dst = torch.empty_like(src)
        ct = measure({"copy": (lambda: dst.copy_(src), None)}, args.rounds, args.steps, 2)
        copy_gbs = 8 * n / statistics.median(ct["copy"]) / 1e9
        step_gbs = (24 if args.weight_decay == 0 else 28) * n / (med[fast] * 1e-3) / 1e9
        result.update(copy_gbs=copy_gbs, step_gbs=step_gbs)
        print(f"copy {copy_gbs:.0f} GB/s; the step moves {step_gbs:.0f} GB/s = "
              f"{100 * step_gbs / copy_gbs:.0f}% of it (claim: > 85%)")
    if args.phases:
        ph = phases(shapes, args.rounds)
        result["phases_ms"] = ph
        print("phases (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
