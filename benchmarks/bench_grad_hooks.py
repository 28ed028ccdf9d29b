"""What SNGM's backward hooks cost and save in a whole training step (CPU or GPU).

A training step (forward, backward, step, zero_grad(set_to_none=True)) of an MLP, for
torch.optim.SGD(fused) and SNGM with its post-accumulate-grad hooks on (fresh grads are moved into
the bucket during backward) and off (the step gathers them). Interleaved rounds, medians.
Usage: python benchmarks/bench_grad_hooks.py [--device cpu|cuda] [--width 2048] [--layers 6]
"""

import argparse
import statistics
import time

import torch

from sngm_ext import SNGM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    dev = torch.device(args.device)

    def make():
        torch.manual_seed(0)
        layers = []
        for _ in range(args.layers):
            layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers).to(dev)

    x = torch.randn(args.batch, args.width, device=dev)
    variants = {}
    m = make()
    variants["sgd-fused"] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9,
                                                 weight_decay=1e-4, fused=True))
    for name, hooks in (("sngm hooks on", True), ("sngm hooks off", False)):
        m = make()
        opt = SNGM(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        variants[name] = (m, opt, hooks)

    def step(v):
        m, opt = v[0], v[1]
        opt.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        opt.step()
        if len(v) == 3 and not v[2] and opt._buckets is not None:
            opt._buckets.release()  # the step gathers the grads instead

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in variants}
    for v in variants.values():
        for _ in range(3):
            step(v)
    sync()
    for r in range(args.rounds):
        for k in list(variants)[r % 3:] + list(variants)[: r % 3]:
            sync()
            t = time.perf_counter()
            step(variants[k])
            sync()
            times[k].append(time.perf_counter() - t)
    n = sum(p.numel() for p in variants["sgd-fused"][0].parameters())
    print(f"MLP {args.layers} x {args.width}^2 ({n / 1e6:.1f}M params), batch {args.batch}, "
          f"{dev}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    base = statistics.median(times["sgd-fused"])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:16s} {med * 1e3:8.2f} ms  {med / base:5.2f}x")


if __name__ == "__main__":
    main()
