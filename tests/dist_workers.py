"""Multi-process checks of SNGM under torch.distributed (gloo, CPU), run by test_distributed.py.

One process per rank: ``python tests/dist_workers.py OUTDIR '[["ddp", ["reference", "cpu"]], ...]'``
with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment: each scenario runs for each of
its backends; each rank writes ``OUTDIR/rank<r>.json``: {"<scenario>[<backend>]": "ok" | traceback}. The first
failure ends the run (the other ranks' collectives then fail fast rather than wait), so later
scenarios are reported missing. Each scenario compares against a single-process SNGM run on the
full batch that every rank computes for itself.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from sngm_ext import SNGM  # noqa: E402

STEPS = 4
BATCH = 12  # divisible by 2 and 3 ranks
UNUSED_STEP = 2  # the `extra` head takes no part on this step: its params get no grad
# fp32, a few steps: the distributed grads differ from the full-batch ones by summation order only
TOL = dict(rtol=2e-5, atol=2e-6)

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- model, data, single process


class Net(nn.Module):
    """Shapes chosen for uneven shards: a (5, 7) weight splits 3/2 on 2 ranks and 2/2/1 on 3, a
    (1, 5) weight and a (1,) bias leave empty shards on every rank but the first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(7, 5)
        self.b = nn.Linear(5, 1)
        self.extra = nn.Linear(5, 1)

    def forward(self, x, use_extra=True):
        h = torch.tanh(self.a(x))
        out = self.b(h)
        return out + self.extra(h) if use_extra else out


def param_groups(model):
    """Several groups: weights with weight decay; biases with Nesterov and their own lr."""
    named = dict(model.named_parameters())
    weights = [named[k] for k in ("a.weight", "b.weight", "extra.weight")]
    biases = [named[k] for k in ("a.bias", "b.bias", "extra.bias")]
    return [
        dict(params=weights, lr=0.1, momentum=0.9, weight_decay=1e-2),
        dict(params=biases, lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
    ]


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 7, generator=g), torch.randn(BATCH, 1, generator=g)


def local_batch(step, rank, world, micro=None):
    x, y = batch(step)
    n = BATCH // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    if micro is not None:  # two micro-batches per step (gradient accumulation)
        h = n // 2
        x, y = (x[:h], y[:h]) if micro == 0 else (x[h:], y[h:])
    return x, y


def loss_fn(model, x, y, step, unused=True):
    """``unused``: the `extra` head sits out step UNUSED_STEP (its params get no grad)."""
    return nn.functional.mse_loss(model(x, use_extra=not (unused and step == UNUSED_STEP)), y)


def names(model):
    return [n for n, _ in model.named_parameters()]


@functools.lru_cache(maxsize=None)
def oracle(backend, norm="global", steps=STEPS, accumulate=False, nan_step=None, unused=True):
    """Single-process SNGM on the full batch: {name: (param, momentum)} after each step."""
    model = Net()
    opt = SNGM(param_groups(model), backend=backend, norm=norm)
    history = []
    for s in range(steps):
        opt.zero_grad()
        x, y = batch(s)
        if accumulate:  # the same micro-batches as the ranks': the union of theirs, per micro step
            for micro in range(2):
                parts = [local_batch(s, r, WORLD, micro) for r in range(WORLD)]
                xs = torch.cat([p[0] for p in parts])
                ys = torch.cat([p[1] for p in parts])
                loss_fn(model, xs, ys, s, unused).backward()
        else:
            loss_fn(model, x, y, s, unused).backward()
        if nan_step == s:
            model.a.weight.grad[0, 0] = float("nan")
        opt.step()
        history.append(snapshot_plain(model, opt))
    return history


def snapshot_plain(model, opt):
    out = {}
    for n, p in model.named_parameters():
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        out[n] = (p.detach().clone(), None if buf is None else buf.detach().clone())
    return out


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def check_against(history_step, got, what):
    for n, (p, m) in history_step.items():
        gp, gm = got[n]
        close(gp, p, f"{what}: param {n}")
        if m is None:
            assert gm is None, f"{what}: {n} has momentum, the single-process run has none"
        else:
            assert gm is not None, f"{what}: {n} has no momentum"
            close(gm, m, f"{what}: momentum of {n}")


def assert_same_on_every_rank(tensors, what):
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    for r, t in enumerate(out):
        assert torch.equal(t, flat), f"{what}: rank {r} differs from rank {RANK} (not bitwise equal)"


class CountCollectives:
    """Counts torch.distributed collectives (and the numel of each all_reduce) while active."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "barrier", "reduce", "gather", "scatter",
             "all_reduce_coalesced")

    def __enter__(self):
        self.calls = []
        self.saved = {}
        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                t = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("tensor")
                self.calls.append((_name, None if t is None else t.numel()))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------- DDP


def _ddp_run(backend, unused=False, accumulate=False, set_to_none=True, sngm_kwargs=None,
             **ddp_kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net()
    ddp = DDP(model, **ddp_kwargs)
    opt = SNGM(param_groups(model), backend=backend, **(sngm_kwargs or {}))
    ref = oracle(backend, accumulate=accumulate, unused=unused)
    for s in range(STEPS):
        opt.zero_grad(set_to_none=set_to_none)
        if accumulate:
            with ddp.no_sync():
                x, y = local_batch(s, RANK, WORLD, micro=0)
                loss_fn(ddp, x, y, s, unused).backward()
            x, y = local_batch(s, RANK, WORLD, micro=1)
            loss_fn(ddp, x, y, s, unused).backward()
        else:
            x, y = local_batch(s, RANK, WORLD)
            loss_fn(ddp, x, y, s, unused).backward()
        if unused and s == UNUSED_STEP:
            assert model.extra.weight.grad is None, "DDP gave the unused param a grad"
        grads = {p: p.grad for p in model.parameters()}
        with CountCollectives() as c:
            opt.step()
        assert not c.calls, f"SNGM under DDP must not communicate, made {c.calls}"
        if ddp_kwargs.get("gradient_as_bucket_view"):
            for n, p in model.named_parameters():
                assert p.grad is grads[p], f"SNGM replaced the grad of {n}, a view of DDP's bucket"
        check_against(ref[s], snapshot_plain(model, opt), f"DDP step {s}")
        assert_same_on_every_rank(list(model.parameters()), f"DDP params after step {s}")
    return model, opt


@scenario
def ddp(backend):
    _ddp_run(backend)


@scenario
def ddp_bucket_view_static_graph(backend):
    """gradient_as_bucket_view: grads are views into DDP's buckets (zeroed in place here); tiny
    buckets, so that a grad spans a whole bucket and still is not SNGM's to re-point."""
    _ddp_run(backend, gradient_as_bucket_view=True, static_graph=True, set_to_none=False,
             bucket_cap_mb=1e-5)


@scenario
def ddp_norm_in_backward(backend):
    """The grad hooks sum each rank's own grads; DDP then writes the averaged ones into p.grad in
    place, which the version counters see: the step must normalize the averaged grads."""
    _ddp_run(backend, sngm_kwargs=dict(norm_in_backward=True))


@scenario
def ddp_bucket_view_norm_in_backward(backend):
    """gradient_as_bucket_view with the grad hooks: DDP all-reduces its buckets (the grads' bases)
    after the hooks summed each rank's own grads; the step must normalize the averaged grads."""
    _ddp_run(backend, gradient_as_bucket_view=True, sngm_kwargs=dict(norm_in_backward=True))


@scenario
def ddp_find_unused_no_sync(backend):
    """find_unused_parameters: a param without a grad sits out; no_sync: accumulation."""
    _ddp_run(backend, unused=True, accumulate=True, find_unused_parameters=True)


# ---------------------------------------------------------------- FSDP2


def fsdp_model(hsdp=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if hsdp:  # a 2-D mesh, replicate x shard: only the shard dim's group is reduced over
        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
    model = Net()
    fully_shard(model.a, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def snapshot_fsdp(model, opt):
    """Full params and momentum (all-gathered: a collective, every rank calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        assert isinstance(p, DTensor)
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        if buf is not None:
            assert isinstance(buf, DTensor) and buf.placements == p.placements, \
                f"momentum of {n} is {type(buf).__name__}, not a DTensor laid out like the param"
            assert buf.shape == p.shape
            buf = buf.full_tensor()
        out[n] = (p.full_tensor(), buf)
    return out


def _fsdp_run(backend, norm, hsdp=False):
    model = fsdp_model(hsdp)
    opt = SNGM(param_groups(model), backend=backend, norm=norm)
    ref = oracle(backend, norm=norm)
    n_params = len(list(model.parameters()))
    for s in range(STEPS):
        opt.zero_grad()
        x, y = local_batch(s, RANK, WORLD)
        loss_fn(model, x, y, s).backward()
        with CountCollectives() as c:
            opt.step()
        n_present = sum(p.grad is not None for p in model.parameters())
        want = 1 if norm == "global" else 1 + n_params
        assert c.calls == [("all_reduce", want)], (
            f"step {s}: expected ONE all_reduce of {want} element(s), got {c.calls} "
            f"({n_present} grads present)"
        )
        check_against(ref[s], snapshot_fsdp(model, opt), f"FSDP2 norm={norm} step {s}")
    return model, opt


@scenario
def fsdp(backend):
    _fsdp_run(backend, "global")


@scenario
def fsdp_tensor_norm(backend):
    _fsdp_run(backend, "tensor")


@scenario
def hsdp_mesh(backend):
    _fsdp_run(backend, "global", hsdp=True)


@scenario
def fsdp_nan_on_one_rank_skips_everywhere(backend):
    model = fsdp_model()
    opt = SNGM(param_groups(model), backend=backend)
    nan_step = 2
    ref = oracle(backend, nan_step=nan_step)
    for s in range(STEPS):
        opt.zero_grad()
        x, y = local_batch(s, RANK, WORLD)
        loss_fn(model, x, y, s).backward()
        if s == nan_step:
            before = {n: (p._local_tensor.clone(),
                          opt.state[p]["momentum_buffer"]._local_tensor.clone())
                      for n, p in model.named_parameters() if p in opt.state}
            if RANK == WORLD - 1:  # the last rank holds a non-empty shard of a.weight
                model.a.weight.grad._local_tensor[0, 0] = float("nan")
        opt.step()
        if s == nan_step:
            assert opt.skipped_steps.item() == 1, f"rank {RANK} did not skip"
            assert not torch.isfinite(opt.grad_norm), f"rank {RANK} saw a finite norm"
            for n, p in model.named_parameters():
                if n in before:
                    assert torch.equal(p._local_tensor, before[n][0]), f"{n} changed"
                    m = opt.state[p]["momentum_buffer"]._local_tensor
                    assert torch.equal(m, before[n][1]), f"momentum of {n} changed"
        check_against(ref[s], snapshot_fsdp(model, opt), f"FSDP2 with a NaN, step {s}")
    assert opt.skipped_steps.item() == 1


@scenario
def fsdp_checkpoint_resume(backend):
    """DCP save/load of sharded momentum; the resumed run equals the uninterrupted one bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    def train(model, opt, steps):
        for s in steps:
            opt.zero_grad()
            x, y = local_batch(s, RANK, WORLD)
            loss_fn(model, x, y, s).backward()
            opt.step()

    def locals_(model, opt):
        return [(p._local_tensor.clone(), opt.state[p]["momentum_buffer"]._local_tensor.clone())
                for p in model.parameters()]

    model = fsdp_model()
    opt = SNGM(param_groups(model), backend=backend)
    train(model, opt, range(2))
    ckpt = os.path.join(OUTDIR, f"ckpt-{backend}")
    msd, osd = get_state_dict(model, opt)
    for k, v in osd["state"].items():
        assert isinstance(v["momentum_buffer"], DTensor), f"momentum of {k} is not sharded"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    train(model, opt, range(2, STEPS))
    want = locals_(model, opt)

    model2 = fsdp_model()  # a fresh run: same init, different optimizer state
    opt2 = SNGM(param_groups(model2), backend=backend)
    msd2, osd2 = get_state_dict(model2, opt2)
    sd = {"model": msd2, "optim": osd2}
    dcp.load(sd, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    train(model2, opt2, range(2, STEPS))
    got = locals_(model2, opt2)
    for (p, m), (p2, m2), n in zip(want, got, names(model)):
        assert torch.equal(p, p2), f"resumed param {n} differs from the uninterrupted run"
        assert torch.equal(m, m2), f"resumed momentum of {n} differs from the uninterrupted run"


# ---------------------------------------------------------------- ZeRO


def zero_optimizer(model, backend, norm="global", **zero_kwargs):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = param_groups(model)
    first, rest = groups[0], groups[1]
    # ZeroRedundancyOptimizer keeps `process_group` for itself: bind SNGM's to the class
    zero = ZeroRedundancyOptimizer(
        first["params"],
        optimizer_class=functools.partial(SNGM, process_group=dist.group.WORLD, backend=backend,
                                          norm=norm),
        lr=first["lr"], momentum=first["momentum"], weight_decay=first["weight_decay"],
        **zero_kwargs,
    )
    zero.add_param_group(rest)
    return zero


def zero_snapshot(model, zero):
    """Params (every rank has all of them after ZeRO's broadcast) and the owned momentum."""
    out = {}
    for n, p in model.named_parameters():
        st = zero.optim.state.get(p, {})
        out[n] = (p.detach().clone(), st.get("momentum_buffer"))
    return out


def check_zero(ref_step, got, what):
    for n, (p, m) in ref_step.items():
        close(got[n][0], p, f"{what}: param {n}")
        if got[n][1] is not None:  # the momentum this rank owns
            close(got[n][1], m, f"{what}: momentum of {n}")


def _zero_run(backend, norm, **zero_kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net()
    ddp = DDP(model, find_unused_parameters=True)
    zero = zero_optimizer(model, backend, norm, **zero_kwargs)
    ref = oracle(backend, norm=norm)
    owned = 0
    for s in range(STEPS):
        zero.zero_grad()
        x, y = local_batch(s, RANK, WORLD)
        loss_fn(ddp, x, y, s).backward()
        with CountCollectives() as c:
            zero.step()
        reduces = [call for call in c.calls if call[0] != "broadcast"]  # ZeRO's own: broadcasts
        assert reduces == [("all_reduce", 1)], f"ZeRO + SNGM made {c.calls}, not one all_reduce"
        got = zero_snapshot(model, zero)
        check_zero(ref[s], got, f"ZeRO norm={norm} step {s}")
        owned += sum(m is not None for _, m in got.values())
    assert owned > 0, f"rank {RANK} owns no param"
    assert_same_on_every_rank(list(model.parameters()), "ZeRO params")


@scenario
def zero(backend):
    _zero_run(backend, "global")


@scenario
def zero_tensor_norm_bucket_view(backend):
    """norm="tensor" (only the total is reduced), params as views of ZeRO's buckets."""
    _zero_run(backend, "tensor", parameters_as_bucket_view=True)


@scenario
def zero_rank_without_grads_and_nan(backend):
    """A rank whose params all have no grad still joins the all-reduce; a NaN on one rank's
    partition skips the step on every rank."""
    for norm in ("global", "tensor"):
        model = Net()
        zero = zero_optimizer(model, backend, norm)
        owners = {}
        for r, groups in enumerate(zero._partition_parameters()):
            for g in groups:
                for p in g["params"]:
                    owners[p] = r
        ref_model = Net()
        ref_opt = SNGM(param_groups(ref_model), backend=backend, norm=norm)
        for s in range(3):
            x, y = batch(s)
            for m in (model, ref_model):  # every rank holds the full grad, as after DDP
                m.zero_grad()
                loss_fn(m, x, y, s).backward()
                if s == 1:  # every param that the last rank owns sits this step out
                    for p, q in zip(model.parameters(), m.parameters()):
                        if owners[p] == WORLD - 1:
                            q.grad = None
                if s == 2 and m is model and RANK == 0:
                    mine = [p for p in model.parameters() if owners[p] == 0]
                    mine[0].grad.view(-1)[0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            zero.step()
            if s == 2:  # skipped everywhere
                assert zero.optim.skipped_steps.item() == 1, f"rank {RANK} did not skip ({norm})"
                for p, b in zip(model.parameters(), before):
                    assert torch.equal(p, b), "a skipped step changed a param"
                continue
            ref_opt.step()
            for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
                close(p.detach(), q.detach(), f"ZeRO {norm}, step {s}, rank without grads: {n}")


# ---------------------------------------------------------------- DTensor edge cases


@scenario
def dtensor_uneven_presence_tensor_norm(backend):
    """norm="tensor" on shards when ranks hold different grads: still one all-reduce, no
    deadlock, and the per-tensor sums land on the right params."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g),
            torch.randn(1, 2, generator=g)]
    grads = [torch.randn(t.shape, generator=g) for t in full]
    params = [nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in full]
    opt = SNGM([dict(params=params[:2]), dict(params=params[2:], lr=0.2)], lr=0.1,
               momentum=0.9, norm="tensor", backend=backend)
    plain = [nn.Parameter(t.clone()) for t in full]
    ref = SNGM([dict(params=plain[:2]), dict(params=plain[2:], lr=0.2)], lr=0.1, momentum=0.9,
               norm="tensor", backend=backend)
    # step 0: param 1 has no grad on any rank; step 1: every grad present;
    # step 2: the last rank has no grad at all, the others have theirs (an inconsistent state:
    # what matters is that nobody waits forever and that every rank agrees on the norms)
    for s in range(3):
        for i, (p, q) in enumerate(zip(params, plain)):
            absent = (s == 0 and i == 1) or (s == 2 and RANK == WORLD - 1)
            dg = distribute_tensor(grads[i] * (s + 1), mesh, [Shard(0)])  # on every rank
            p.grad = None if absent else dg
            q.grad = None if (s == 0 and i == 1) else grads[i] * (s + 1)
        with CountCollectives() as c:
            opt.step()
        assert c.calls == [("all_reduce", 1 + len(params))], c.calls
        if s < 2:
            ref.step()
            for i, (p, q) in enumerate(zip(params, plain)):
                close(p.full_tensor(), q.detach(), f"step {s}, param {i}")
    assert_same_on_every_rank([opt.grad_norm], "grad_norm")


@scenario
def mixed_process_groups_are_refused(backend):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    model = fsdp_model()
    stray = nn.Parameter(torch.zeros(3))
    try:
        SNGM(list(model.parameters()) + [stray], lr=0.1, backend=backend)
    except ValueError as e:
        assert "one process group" in str(e), e
    else:
        raise AssertionError("FSDP2 params mixed with a plain tensor were accepted")
    # a 2-D mesh whose second dim is one rank: a param sharded over it lives on another group
    mesh2 = DeviceMesh("cpu", torch.arange(WORLD).view(WORLD, 1))
    other = nn.Parameter(distribute_tensor(torch.zeros(4), mesh2, [Replicate(), Shard(0)]))
    opt = SNGM(list(model.parameters()), lr=0.1, backend=backend)
    try:
        opt.add_param_group({"params": [other]})
    except ValueError as e:
        assert "one process group" in str(e), e
    else:
        raise AssertionError("params on different process groups were accepted")
    assert len(opt.param_groups) == 1
    sub = dist.new_group(list(range(WORLD - 1)))  # every rank must call new_group
    if RANK < WORLD - 1:
        try:
            SNGM(list(model.parameters()), lr=0.1, backend=backend, process_group=sub)
        except ValueError as e:
            assert "process_group" in str(e), e
        else:
            raise AssertionError("a process_group other than the params' mesh was accepted")


# ---------------------------------------------------------------- driver

RANK = WORLD = 0
OUTDIR = ""


def main(argv):
    global RANK, WORLD, OUTDIR
    OUTDIR, plan = argv[0], json.loads(argv[1])  # [[scenario, [backend, ...]], ...]
    RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=RANK, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=int(os.environ.get(
                                "SNGM_DIST_TIMEOUT", "60"))))
    results = {}
    path = os.path.join(OUTDIR, f"rank{RANK}.json")
    failed = False
    for name, backends in plan:
        for backend in backends:
            key = f"{name}[{backend}]"
            t0 = time.perf_counter()
            try:
                SCENARIOS[name](backend)
                results[key] = "ok"
                if RANK == 0:
                    print(f"{key}: {time.perf_counter() - t0:.2f} s", flush=True)
            except BaseException:  # noqa: BLE001
                results[key] = traceback.format_exc()
                failed = True
            with open(path, "w") as f:
                json.dump(results, f)
            if failed:
                sys.stderr.write(results[key])
                os._exit(1)  # the other ranks' pending collectives fail fast
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
