"""What SNGM's one extra collective costs under torch.distributed, on CPU processes (gloo).

    python benchmarks/bench_distributed.py                      # 2 ranks, writes the JSON below
    python benchmarks/bench_distributed.py --world 2 --width 1024 --depth 4 --rounds 6

Launches ``--world`` processes of itself (loopback, a free port) and measures:

1. FSDP2 (``fully_shard`` per layer, CPU mesh): one training step (zero_grad, forward, backward,
   optimizer step) and the optimizer step alone, for torch.optim.SGD (momentum, weight decay) and
   SNGM; SNGM again with its all-reduce switched off (a local norm: wrong maths, only to isolate
   what the collective costs); and the all-reduce of one fp32 scalar by itself.
2. DDP: the squared norm of the averaged grads computed (a) by a separate pass after backward
   (``torch._foreach_norm`` over the grads) or (b) inside a DDP communication hook, on each bucket
   right after its all-reduce, while the bucket may still be in cache. What (b) saves is read as
   time(backward with the hook) - time(backward without) against time(the separate pass).

Variants run in interleaved rounds (order rotated each round) so that drift of a shared machine
hits them alike; numbers are medians over all steps of all rounds, with the 20-80 % spread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "distributed_cpu.json")


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def summary(xs):
    return {"median_ms": 1e3 * statistics.median(xs), "p20_ms": 1e3 * _q(xs, 0.2),
            "p80_ms": 1e3 * _q(xs, 0.8), "n": len(xs)}


# ---------------------------------------------------------------- worker (one per rank)


def worker(args):
    import torch
    import torch.distributed as dist
    from torch import nn

    from sngm_ext import SNGM, resolve_backend

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    backend = resolve_backend("auto", torch.device("cpu"))[0]

    def mlp():
        torch.manual_seed(0)
        layers = []
        for _ in range(args.depth):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(args.width, 10))

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)

    def timed_rounds(variants, per_round, rounds):
        """variants: name -> callable returning {label: seconds}; interleaved rounds."""
        out = {n: {} for n in variants}
        names = list(variants)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                for _ in range(per_round):
                    for label, t in variants[n]().items():
                        out[n].setdefault(label, []).append(t)
        return {n: {k: summary(v) for k, v in d.items()} for n, d in out.items()}

    results = {}

    # ------------------------------------------------ 1. FSDP2: SGD vs SNGM, with/without reduce
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def fsdp_variant(make_opt, no_reduce=False):
        model = mlp()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = make_opt(model.parameters())
        timing = {"reduce": 0.0}
        if no_reduce:
            opt._dist_plan().groups = ()  # local norm only: isolates the collective's cost
        elif isinstance(opt, SNGM):  # time the all-reduce inside the step
            plan = opt._dist_plan()
            make = plan.reducer

            def timed_reducer(*a, **k):
                fn = make(*a, **k)

                def run(sumsq):
                    t0 = time.perf_counter()
                    fn(sumsq)
                    timing["reduce"] += time.perf_counter() - t0
                return run
            plan.reducer = timed_reducer

        def step():
            timing["reduce"] = 0.0
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            out = {"train_step": t2 - t0, "optimizer_step": t2 - t1}
            if isinstance(opt, SNGM) and not no_reduce:
                out["all_reduce_in_step"] = timing["reduce"]
            return out
        for _ in range(3):  # warm-up: tables, JIT, gloo connections
            step()

        def step_only():  # the optimizer step again on the same grads: many short samples
            timing["reduce"] = 0.0
            t0 = time.perf_counter()
            opt.step()
            out = {"optimizer_step": time.perf_counter() - t0}
            if isinstance(opt, SNGM) and not no_reduce:
                out["all_reduce_in_step"] = timing["reduce"]
            return out
        step.only = step_only
        return step

    variants = {
        "SGD": fsdp_variant(lambda ps: torch.optim.SGD(ps, **hyper)),
        f"SNGM[{backend}]": fsdp_variant(lambda ps: SNGM(ps, **hyper, backend=backend)),
        f"SNGM[{backend}] no all-reduce": fsdp_variant(
            lambda ps: SNGM(ps, **hyper, backend=backend), no_reduce=True),
    }
    if backend != "reference":
        variants["SNGM[reference]"] = fsdp_variant(
            lambda ps: SNGM(ps, **hyper, backend="reference"))
    results["fsdp2"] = timed_rounds(variants, args.steps, args.rounds)
    results["fsdp2_step_only"] = timed_rounds({n: v.only for n, v in variants.items()},
                                              4 * args.steps, args.rounds)

    t = torch.zeros(1)
    for _ in range(20):
        dist.all_reduce(t)
    samples = []
    for _ in range(args.collectives):
        t0 = time.perf_counter()
        dist.all_reduce(t)
        samples.append(time.perf_counter() - t0)
    results["all_reduce_1_fp32"] = summary(samples)

    # ------------------------------------------------ 2. DDP: norm in a comm hook vs a separate pass
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    class HookState:
        def __init__(self):
            self.sumsq = torch.zeros((), dtype=torch.float64)
            self.seconds = 0.0  # spent on the norm inside the hook

    def sumsq_hook(state, bucket):
        fut = allreduce_hook(None, bucket)  # the default: all-reduce, divide by the world size

        def then(f):
            buf = f.value()
            t0 = time.perf_counter()
            state.sumsq += torch.dot(buf, buf)  # the reduced bucket, just written
            state.seconds += time.perf_counter() - t0
            return buf
        return fut.then(then)

    def ddp_variant(hooked):
        model = mlp()
        ddp = DDP(model, bucket_cap_mb=args.bucket_mb)
        st = HookState()
        if hooked:
            ddp.register_comm_hook(st, sumsq_hook)
        grads = None

        def step():
            nonlocal grads
            model.zero_grad(set_to_none=False)
            st.sumsq.zero_()
            st.seconds = 0.0
            t0 = time.perf_counter()
            nn.functional.cross_entropy(ddp(x), y).backward()
            t1 = time.perf_counter()
            out = {"forward_backward": t1 - t0}
            if not hooked:
                if grads is None:
                    grads = [p.grad for p in model.parameters()]
                n = torch.stack(torch._foreach_norm(grads)).double().square().sum()
                t2 = time.perf_counter()
                out["norm_pass"] = t2 - t1
                out["forward_backward+norm"] = t2 - t0
                step.sumsq = n
            else:
                out["forward_backward+norm"] = t1 - t0
                out["norm_in_hook"] = st.seconds
                step.sumsq = st.sumsq.clone()
            return out
        for _ in range(3):
            step()
        return step

    ddp_variants = {"separate norm pass": ddp_variant(False), "norm in comm hook": ddp_variant(True)}
    results["ddp_norm"] = timed_rounds(ddp_variants, args.steps, args.rounds)
    a = ddp_variants["separate norm pass"].sumsq
    b = ddp_variants["norm in comm hook"].sumsq
    results["ddp_norm_agree"] = bool(torch.allclose(a, b, rtol=1e-4))

    if rank == 0:
        with open(args.result_file, "w") as f:
            json.dump({"backend": backend, "results": results}, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- launcher


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--collectives", type=int, default=500)
    ap.add_argument("--bucket-mb", type=float, default=4.0, help="DDP bucket_cap_mb")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    tmp = args.out + ".tmp"
    port = _free_port()
    argv = [a for a in sys.argv[1:]]
    procs = []
    load0 = os.getloadavg()
    t0 = time.time()
    for rank in range(args.world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv, "--worker", "--result-file", tmp],
            env=env))
    rc = [p.wait(timeout=1800) for p in procs]
    if any(rc):
        sys.exit(f"a rank failed: exit codes {rc}")
    with open(tmp) as f:
        data = json.load(f)
    os.remove(tmp)
    n_params = (args.width * args.width + args.width) * args.depth + args.width * 10 + 10
    data["setup"] = dict(
        world=args.world, params=n_params, width=args.width, depth=args.depth,
        batch_per_rank=args.batch, steps_per_round=args.steps, rounds=args.rounds,
        ddp_bucket_cap_mb=args.bucket_mb, threads_per_rank=args.threads, torch=torch.__version__,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        load_average_before=load0, load_average_after=os.getloadavg(),
        wall_s=round(time.time() - t0, 1), date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    report(data)


def report(data):
    s = data["setup"]
    print(f"{s['world']} ranks (gloo, CPU, {s['threads_per_rank']} thread each), MLP "
          f"{s['depth']}x{s['width']} ({s['params'] / 1e6:.2f}M params), batch {s['batch_per_rank']}"
          f"/rank; load average {s['load_average_before'][0]:.1f} -> {s['load_average_after'][0]:.1f}")
    r = data["results"]
    print("FSDP2                                train step ms         optimizer step ms")
    for name, d in r["fsdp2"].items():
        ts, os_ = d["train_step"], d["optimizer_step"]
        ar = d.get("all_reduce_in_step")
        print(f"  {name:32s} {ts['median_ms']:8.2f} [{ts['p20_ms']:.2f}, {ts['p80_ms']:.2f}]"
              f"   {os_['median_ms']:8.3f} [{os_['p20_ms']:.3f}, {os_['p80_ms']:.3f}]"
              + (f"   all-reduce in it {ar['median_ms']:.3f} [{ar['p20_ms']:.3f}, "
                 f"{ar['p80_ms']:.3f}]" if ar else ""))
    print("FSDP2, optimizer step alone on the same grads      ms")
    for name, d in r["fsdp2_step_only"].items():
        o, ar = d["optimizer_step"], d.get("all_reduce_in_step")
        print(f"  {name:32s} {o['median_ms']:8.3f} [{o['p20_ms']:.3f}, {o['p80_ms']:.3f}]"
              + (f"   all-reduce in it {ar['median_ms']:.3f} [{ar['p20_ms']:.3f}, "
                 f"{ar['p80_ms']:.3f}]" if ar else ""))
    c = r["all_reduce_1_fp32"]
    print(f"  all_reduce of one fp32 scalar: {1e3 * c['median_ms']:.1f} us "
          f"[{1e3 * c['p20_ms']:.1f}, {1e3 * c['p80_ms']:.1f}]")
    print("DDP: squared norm of the reduced grads       fwd+bwd ms   norm (pass/hook) ms  total ms")
    for name, d in r["ddp_norm"].items():
        fb, tot = d["forward_backward"], d["forward_backward+norm"]
        npass = d.get("norm_pass", d.get("norm_in_hook", {})).get("median_ms")
        print(f"  {name:40s} {fb['median_ms']:8.2f}   "
              f"{'-' if npass is None else f'{npass:8.3f}':>12}   {tot['median_ms']:8.2f}")
    print(f"  both give the same norm: {r['ddp_norm_agree']}")


if __name__ == "__main__":
    main()
