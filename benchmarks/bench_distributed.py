"""What SNGM's one collective costs in an FSDP2 x TP step, on CPU processes (gloo).

    python benchmarks/bench_distributed.py            # 4 ranks, a (dp=2, tp=2) mesh; writes the JSON
    python benchmarks/bench_distributed.py --width 512 --blocks 4 --rounds 8

Launches ``--world`` processes of itself (loopback, a free port). Each builds blocks of a
LayerNorm (left plain: FSDP2 shards it over dp only), a ColwiseParallel and a RowwiseParallel
Linear (whose bias stays Replicate), parallelized over tp and fully sharded over dp: the mix of
2-D shards, 1-D shards and replicas for which SNGM weights each param's sum of squares. After one
forward and backward, the optimizer step alone is timed on those grads (benchmarks/timing.py:
interleaved rounds, the same schedule on every rank) for:

* ``SGD``: torch.optim.SGD (momentum, weight decay), the baseline;
* ``SNGM``: SNGM, its all_gather over the mesh included;
* ``SNGM, no collective``: the same step with the gather replaced by the local vector (wrong
  maths, the same work otherwise): the difference to ``SNGM`` is what the collective costs;
* ``all_gather alone``: the gather of the step's three fp64 sums (med, big, small) over the
  world, by itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from timing import cpu_name  # noqa: E402
DEFAULT_OUT = os.path.join(HERE, "results", "distributed_cpu_fsdp2_tp.json")


# ---------------------------------------------------------------- worker (one per rank)


def worker(args):
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    sys.path.insert(0, HERE)
    from timing import Case, Timer, run_interleaved, summarize

    import sngm_ext.distributed as sngm_dist
    from sngm_ext import SNGM, resolve_backend

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    backend = resolve_backend("auto", torch.device("cpu"))[0]
    mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    w = args.width

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.up, self.down = nn.LayerNorm(w), nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    def model_with_grads():
        torch.manual_seed(0)
        model = nn.Sequential(*[Block() for _ in range(args.blocks)])
        for block in model:
            parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(),
                                                   "down": RowwiseParallel()})
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        g = torch.Generator().manual_seed(mesh["dp"].get_local_rank())
        model(torch.randn(args.batch, w, generator=g)).square().mean().backward()
        return model

    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    sgd = torch.optim.SGD(model_with_grads().parameters(), **hyper)
    sngm = SNGM(model_with_grads().parameters(), **hyper, backend=backend)
    sngm_local = SNGM(model_with_grads().parameters(), **hyper, backend=backend)
    plan = sngm._dist_plan()
    gather_sum = sngm_dist._gather_sum

    def no_collective():
        sngm_dist._gather_sum = lambda v, groups, n_sum, with_check: v
        try:
            sngm_local.step()
        finally:
            sngm_dist._gather_sum = gather_sum

    sums = torch.zeros(3, dtype=torch.float64)  # what a global-norm step gathers
    cases = [
        Case("SGD", sgd.step),
        Case("SNGM", sngm.step),
        Case("SNGM, no collective", no_collective),
        Case("all_gather alone", lambda: gather_sum(sums, plan.groups, 3, False)),
    ]
    # no deadline: every rank must run the same schedule (the steps are collectives)
    samples = run_interleaved(Timer(torch.device("cpu")), cases, warmup=args.warmup,
                              rounds=args.rounds, per_round=args.per_round)
    stats = {name: summarize(xs) for name, xs in samples.items()}
    if rank == 0:
        n_params = sum(p.numel() for p in sngm.param_groups[0]["params"])
        with open(args.result_file, "w") as f:
            json.dump({"backend": backend, "params": n_params,
                       "groups": len(plan.groups), "needs_per_tensor_sums":
                       plan.needs_per_tensor_sums, "results": stats}, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- launcher


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2, help="tp size; dp = world / tp")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="per dp rank")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--note", default="", help="stored with the results: the machine, its load")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    tmp = args.out + ".tmp"
    port = _free_port()
    load0 = os.getloadavg()
    t0 = time.time()
    procs = []
    for rank in range(args.world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker",
             "--result-file", tmp], env=env))
    rc = [p.wait(timeout=1800) for p in procs]
    if any(rc):
        sys.exit(f"a rank failed: exit codes {rc}")
    with open(tmp) as f:
        data = json.load(f)
    os.remove(tmp)
    med = {k: v["median_s"] * 1e3 for k, v in data["results"].items()}
    data["collective_in_step_ms"] = med["SNGM"] - med["SNGM, no collective"]
    data["setup"] = dict(
        world=args.world, mesh={"dp": args.world // args.tp, "tp": args.tp}, width=args.width,
        blocks=args.blocks, batch_per_dp_rank=args.batch, warmup=args.warmup, rounds=args.rounds,
        per_round=args.per_round, threads_per_rank=args.threads, torch=torch.__version__,
        process_group_backend="gloo", cpu=cpu_name(), cores=os.cpu_count(), note=args.note,
        load_average_before=load0, load_average_after=os.getloadavg(),
        wall_s=round(time.time() - t0, 1),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    report(data)


def report(data):
    s = data["setup"]
    print(f"{s['world']} ranks (gloo, {s['threads_per_rank']} thread each, {s['cores']} cores: "
          f"{s['cpu']}), mesh dp={s['mesh']['dp']} x tp={s['mesh']['tp']}, {s['blocks']} blocks "
          f"of width {s['width']} ({data['params'] / 1e6:.2f}M params); load average "
          f"{s['load_average_before'][0]:.1f} -> {s['load_average_after'][0]:.1f}")
    print(f"  {'optimizer step':24s} {'median ms':>10s} {'p25':>8s} {'p75':>8s}")
    for name, st in data["results"].items():
        print(f"  {name:24s} {st['median_s'] * 1e3:10.3f} {st['p25_s'] * 1e3:8.3f} "
              f"{st['p75_s'] * 1e3:8.3f}")
    print(f"  the collective in SNGM's step: {data['collective_in_step_ms']:.3f} ms "
          f"({data['groups']} group(s), per-tensor sums: {data['needs_per_tensor_sums']})")


if __name__ == "__main__":
    main()
