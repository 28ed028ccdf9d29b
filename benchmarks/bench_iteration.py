"""Whole training iterations: SNGM against torch.optim.SGD, with the cost moved into backward
counted (CPU or GPU).

A training iteration (zero_grad(set_to_none=True), forward, backward, step) for torch.optim.SGD
(fused and foreach), for SNGM in plain ``_foreach`` ops (foreach_sngm.py: what a user could write)
and for sngm_ext's SNGM two ways:

    sngm                   the default: the step runs both phases over the user's tensors
    sngm norm in backward  ``norm_in_backward=True``: a post-accumulate-grad hook sums the squares
                           of each fresh grad where it lies (in cache); the step runs the update

Forward+backward and the step are timed apart (timing.py's interleaved rounds, one iteration per
variant per round, medians), so the table shows where each variant spends its time as well as the
whole iteration (the median of the sum over the same iterations).

Models:
    mlp              ``--layers`` Linear(width, width) + ReLU layers, batch ``--batch``
    resnet50-params  ResNet-50's 161 parameter tensors (25.6M), each with the loss
                     sum(p * r) for a fixed random r: backward is one elementwise product per
                     tensor, so the iteration is almost all optimizer (and hooks)

Usage: python benchmarks/bench_iteration.py [--model mlp|resnet50-params] [--device cpu|cuda]
       [--weight-decay 1e-4] [--threads 2] [--json FILE]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from foreach_sngm import ForeachSNGM  # noqa: E402
from param_sets import resnet50  # noqa: E402
from timing import Case, Timer, run_interleaved_parts  # noqa: E402

from sngm_ext import SNGM  # noqa: E402


class ParamsOnly(torch.nn.Module):
    """Params of the given shapes; loss = sum_i sum(p_i * r_i), so grad_i = r_i (a fresh tensor)."""

    def __init__(self, shapes):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g) * 0.05)
                                          for s in shapes])
        for i, s in enumerate(shapes):
            self.register_buffer(f"r{i}", torch.randn(s, generator=g))

    def forward(self, _x):
        return sum((p * getattr(self, f"r{i}")).sum() for i, p in enumerate(self.ps))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["mlp", "resnet50-params"], default="mlp")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--amp", action="store_true",
                    help="fp16 autocast and a torch.amp.GradScaler per variant (scaler.step: "
                         "fused SGD and SNGM take its fused path, the others unscale first)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)

    def make():
        torch.manual_seed(0)
        if args.model == "resnet50-params":
            return ParamsOnly(resnet50().shapes).to(dev)
        layers = []
        for _ in range(args.layers):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers).to(dev)

    x = torch.randn(args.batch, args.width, device=dev)
    wd = args.weight_decay
    variants = {}
    for name, kw in (("sgd fused", dict(fused=True)), ("sgd foreach", dict(foreach=True))):
        m = make()
        variants[name] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=wd, **kw))
    m = make()
    variants["sngm foreach"] = (m, ForeachSNGM(m.parameters(), lr=0.01, momentum=0.9, weight_decay=wd))
    for name, kw in (("sngm", {}), ("sngm norm in backward", dict(norm_in_backward=True))):
        m = make()
        variants[name] = (m, SNGM(m.parameters(), lr=0.01, momentum=0.9, weight_decay=wd, **kw))

    scalers = {k: torch.amp.GradScaler(dev.type) for k in variants} if args.amp else {}
    timer = Timer(dev)

    def iteration(name):
        m, opt = variants[name]
        sc = scalers.get(name)
        t0 = timer.now()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=sc is not None):
            out = m(x).float()
        # ResNet-50's params: the loss is sum(p * r) itself (grads r, finite forever; its square
        # grows without bound under SGD until a GradScaler skips every step)
        loss = out if args.model == "resnet50-params" else out.square().mean()
        (loss if sc is None else sc.scale(loss)).backward()
        t1 = timer.now()
        if sc is None:
            opt.step()
        else:
            sc.step(opt)
            sc.update()
        return {"fwd_bwd": t1 - t0, "step": timer.now() - t1}

    names = list(variants)
    cases = [Case(k, lambda k=k: iteration(k)) for k in names]
    samples = run_interleaved_parts(timer, cases, warmup=3, rounds=args.rounds, per_round=1)
    fb = {k: samples[k]["fwd_bwd"] for k in names}
    st = {k: samples[k]["step"] for k in names}

    n = sum(p.numel() for p in variants["sgd fused"][0].parameters())
    what = ("ResNet-50's params (161 tensors), loss sum(p * r)" if args.model == "resnet50-params"
            else f"MLP {args.layers} x {args.width}^2, batch {args.batch}")
    head = (f"{what}: {n / 1e6:.1f}M params, weight decay {wd:g}, momentum 0.9, {dev}, "
            + ("fp16 autocast + GradScaler, " if args.amp else "")
            + f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} rounds")
    print(head)
    med = {k: (statistics.median(fb[k]) * 1e3, statistics.median(st[k]) * 1e3) for k in names}
    whole = {k: statistics.median([a + b for a, b in zip(fb[k], st[k])]) * 1e3 for k in names}
    best_sgd = min(("sgd fused", "sgd foreach"), key=lambda k: whole[k])
    base, base_step = whole[best_sgd], med[best_sgd][1]
    print(f"{'variant':22s} {'fwd+bwd ms':>10s} {'step ms':>9s} {'whole ms':>9s} "
          f"{'whole vs ' + best_sgd:>18s} {'step vs ' + best_sgd:>17s}")
    rows = {}
    for k in names:
        a, b = med[k]
        rows[k] = dict(fwd_bwd_ms=a, step_ms=b, whole_ms=whole[k], whole_ratio=whole[k] / base,
                       step_ratio=b / base_step)
        print(f"{k:22s} {a:10.2f} {b:9.2f} {whole[k]:9.2f} {whole[k] / base:17.2f}x {b / base_step:16.2f}x")
    nib = variants["sngm norm in backward"][1]
    print(f"norm in backward: the step used the hooks' sums in {nib._sums.served} of "
          f"{nib._sums.steps} steps")
    if args.json:
        out = dict(what=head, best_sgd=best_sgd, variants=rows, args=vars(args),
                   machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   date=time.strftime("%Y-%m-%d %H:%M"))
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
