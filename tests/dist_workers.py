"""Multi-process checks of SNGM under torch.distributed (gloo, CPU), run by test_distributed.py.

DDP, FSDP2, HSDP, tensor parallel (a Replicate bias and a plain LayerNorm beside the shards),
FSDP2 x TP, FSDP1, ZeroRedundancyOptimizer, DeepSpeed ZeRO, and the refusals.

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
import math
import os
import sys
import time
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed reads it at import

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from bounds import UNIT, gamma  # noqa: E402
from sngm_ext import SNGM  # noqa: E402
from sngm_ext.distributed import LOCAL  # noqa: E402  (the single-process runs every rank makes)

STEPS = 4
BATCH = 12  # divisible by 2, 3 and 4 ranks
UNUSED_STEP = 2  # the `extra` head takes no part on this step: its params get no grad
# fp32. The distributed grads are the same per-sample terms summed in another grouping and order
# (each rank's local batch, then the all-reduce; 1/B or 1/(B/W) before it): per element
# |dg_i| <= gamma_k A_i, A = sum_b |G_b| the per-sample grads' absolute sum, k <= 28 roundings
# (12 batch rows, <= 16 hidden units; Higham, Accuracy and Stability of Numerical Algorithms,
# eq. (3.4)/(4.4)). With n = ||d|| and kappa = ||A|| / n (the grads' summation condition number,
# at most KAPPA: the single-process runs check it at every step), ||dd|| <= gamma_k kappa n, so
# |d(d_i / n)| <= |dd_i| / n + |d_i| ||dd|| / n^2 <= 2 gamma_k kappa. Momentum sums these with
# weights beta^j: |du| <= 2 gamma_k kappa / (1 - beta) (beta <= 0.9); each step moves w by lr u
# (lr <= 0.1): after STEPS steps |dw| <= STEPS lr |du|; the norm moves by gamma_k kappa relative.
# Each run also rounds u and w to fp32 once per step (one unit at the element's scale: rtol
# 2 STEPS eps, as in scenarios.py). A difference in the params also reaches the next grads
# through the loss's curvature, by lr ||H|| / n times it, below 1 for these small nets. A
# per-rank norm is off by O(1) relative (the issue measured 0.066 on the params).
KAPPA = 4.0  # measured: 1.6 to 2.8 for Net and TPNet on these batches
_ND = 2 * gamma(28, UNIT[torch.float32]) * KAPPA  # per element |d(d_i / n)|
_FLIPS = 2 * STEPS * torch.finfo(torch.float32).eps
MOMENTUM_TOL = dict(rtol=_FLIPS, atol=_ND / (1 - 0.9))
TOL = dict(rtol=_FLIPS, atol=STEPS * 0.1 * MOMENTUM_TOL["atol"])  # params
NORM_TOL = dict(rtol=_ND / 2 + _FLIPS, atol=0.0)  # n itself


def absolute_grad_norm(model, per_sample_loss, n_samples):
    """||sum_b |G_b| ||, G_b the grad of ``per_sample_loss(b)`` (the step's loss is their sum) at
    the model's current params: kappa's numerator (above). Leaves the model's grads zeroed."""
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in range(n_samples):
        model.zero_grad()
        per_sample_loss(b).backward()
        for t, p in zip(total, params):
            if p.grad is not None:
                t += p.grad.double().abs()
    model.zero_grad()
    return torch.sqrt(sum(t.square().sum() for t in total)).item()


def check_summation_condition(absolute_norm, opt, what):
    """The premise of the tolerances above, for the step ``opt`` just took."""
    n = opt.grad_norm.item()
    if math.isfinite(n):  # a skipped step has nothing to compare
        assert absolute_norm <= KAPPA * n, \
            f"{what}: the grads' summation condition {absolute_norm / n:.3g} > KAPPA = {KAPPA}"


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


ONE_GROUP = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)


@functools.lru_cache(maxsize=None)
def oracle(backend, norm="global", steps=STEPS, accumulate=False, nan_step=None, unused=True,
           one_group=False):
    """Single-process SNGM on the full batch: {name: (param, momentum)} after each step, and the
    step's grad_norm under the key "grad_norm"."""
    model = Net()
    opt = SNGM(model.parameters() if one_group else param_groups(model), backend=backend,
               norm=norm, process_group=LOCAL, **(ONE_GROUP if one_group else {}))
    history = []
    for s in range(steps):
        opt.zero_grad()
        x, y = batch(s)
        if accumulate:  # the same micro-batches as the ranks': the union of theirs, per micro step
            micros = []
            for micro in range(2):
                parts = [local_batch(s, r, WORLD, micro) for r in range(WORLD)]
                micros.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
            xs, ys = (torch.cat(t) for t in zip(*micros))  # each sample weighs 1 / micro-batch
            absolute = absolute_grad_norm(model, lambda b: loss_fn(
                model, xs[b:b + 1], ys[b:b + 1], s, unused) / len(micros[0][0]), len(xs))
            for mx, my in micros:
                loss_fn(model, mx, my, s, unused).backward()
        else:
            absolute = absolute_grad_norm(model, lambda b: loss_fn(
                model, x[b:b + 1], y[b:b + 1], s, unused) / len(x), len(x))
            loss_fn(model, x, y, s, unused).backward()
        if nan_step == s:
            model.a.weight.grad[0, 0] = float("nan")
        opt.step()
        check_summation_condition(absolute, opt, f"single-process step {s}")
        history.append(snapshot_plain(model, opt))
        history[-1]["grad_norm"] = opt.grad_norm.clone()
    return history


def snapshot_plain(model, opt):
    out = {}
    for n, p in model.named_parameters():
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        out[n] = (p.detach().clone(), None if buf is None else buf.detach().clone())
    return out


def close(actual, expected, what, tol=TOL):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def check_norm(history_step, opt, what):
    """grad_norm as in the single-process run, and bitwise the same on every rank."""
    close(opt.grad_norm, history_step["grad_norm"], f"{what}: grad_norm", NORM_TOL)
    assert_same_on_every_rank([opt.grad_norm], f"{what}: grad_norm")


def params_of(history_step):
    return {k: v for k, v in history_step.items() if k != "grad_norm"}


def check_against(history_step, got, what):
    for n, (p, m) in params_of(history_step).items():
        gp, gm = got[n]
        close(gp, p, f"{what}: param {n}")
        if m is None:
            assert gm is None, f"{what}: {n} has momentum, the single-process run has none"
        else:
            assert gm is not None, f"{what}: {n} has no momentum"
            close(gm, m, f"{what}: momentum of {n}", MOMENTUM_TOL)


def assert_same_on_every_rank(tensors, what):
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    out = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(out, flat)
    for r, t in enumerate(out):
        assert torch.equal(t, flat), f"{what}: rank {r} differs from rank {RANK} (not bitwise equal)"


class CountCollectives:
    """Counts torch.distributed collectives (and the numel of each all_reduce) while active."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
             "all_gather_single", "reduce_scatter",
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


GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


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
        # the first step checks once that every rank holds the same gradient: one gather of
        # (sum, sum, non-finite); then nothing
        want = [(GATHER, 3 * WORLD)] if s == 0 else []
        assert c.calls == want, f"SNGM under DDP, step {s}: made {c.calls}, not {want}"
        if ddp_kwargs.get("gradient_as_bucket_view"):
            for n, p in model.named_parameters():
                assert p.grad is grads[p], f"SNGM replaced the grad of {n}, a view of DDP's bucket"
        check_against(ref[s], snapshot_plain(model, opt), f"DDP step {s}")
        check_norm(ref[s], opt, f"DDP step {s}")
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


def fsdp_model(replicas=None, dtype=torch.float32):
    """Net fully sharded over the world, or (HSDP) over a (replicas, WORLD / replicas) mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if replicas:  # a 2-D mesh, replicate x shard: only the shard dim's group is reduced over
        mesh = init_device_mesh("cpu", (replicas, WORLD // replicas),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (WORLD,))
    model = Net().to(dtype)
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


def _fsdp_run(backend, norm, replicas=None, what=None):
    what = what or f"FSDP2 norm={norm}"
    model = fsdp_model(replicas)
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
        want = WORLD * 3 * (1 if norm == "global" else 1 + n_params)  # 3 rows: med, big, small
        assert c.calls == [(GATHER, want)], (
            f"step {s}: expected ONE all_gather of {want} element(s), got {c.calls} "
            f"({n_present} grads present)"
        )
        check_against(ref[s], snapshot_fsdp(model, opt), f"{what} step {s}")
        check_norm(ref[s], opt, f"{what} step {s}")
    return model, opt


@scenario
def fsdp(backend):
    _fsdp_run(backend, "global")


@scenario
def fsdp_tensor_norm(backend):
    _fsdp_run(backend, "tensor")


@scenario
def hsdp_mesh(backend):
    _fsdp_run(backend, "global", replicas=1)


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
    for n, (p, m) in params_of(ref_step).items():
        close(got[n][0], p, f"{what}: param {n}")
        if got[n][1] is not None:  # the momentum this rank owns
            close(got[n][1], m, f"{what}: momentum of {n}", MOMENTUM_TOL)


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
        # the first step also checks that the ranks do not all hold the same gradient
        want = [(GATHER, WORLD * (6 if s == 0 else 3))]  # 3 rows of sums (+ 3 check entries)
        assert reduces == want, f"ZeRO + SNGM step {s} made {c.calls}, not {want}"
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
        ref_opt = SNGM(param_groups(ref_model), backend=backend, norm=norm, process_group=LOCAL)
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
               norm="tensor", backend=backend, process_group=LOCAL)
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
        assert c.calls == [(GATHER, WORLD * 3 * (1 + len(params)))], c.calls
        if s < 2:
            ref.step()
            for i, (p, q) in enumerate(zip(params, plain)):
                close(p.full_tensor(), q.detach(), f"step {s}, param {i}")
    assert_same_on_every_rank([opt.grad_norm], "grad_norm")


@scenario
def unreducible_params_are_refused(backend):
    """What no reduction can make right is refused when the params are given, not at a step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    def refused(match, *args, **kwargs):
        try:
            SNGM(*args, lr=0.1, backend=backend, **kwargs)
        except ValueError as e:
            assert match in str(e), e
        else:
            raise AssertionError(f"accepted: {kwargs}")

    mesh = init_device_mesh("cpu", (WORLD,))
    partial = nn.Parameter(DTensor.from_local(torch.zeros(4), mesh, [Partial()]))
    refused("Shard or Replicate", [partial])
    model = fsdp_model()
    refused("process_group='local' with DTensor", model.parameters(), process_group="local")
    refused("give a ProcessGroup", model.parameters(), process_group="world")
    sub = dist.new_group(list(range(WORLD - 1)))  # every rank must call new_group
    if RANK < WORLD - 1:
        refused("leave process_group=None", model.parameters(), process_group=sub)


# ---------------------------------------------------------------- refusals and the way out


def local_copies(params):
    from sngm_ext.distributed import local_tensor

    return [local_tensor(p).detach().clone() for p in params]


def assert_refused(opt, params, step, match):
    """``step()`` raises, on every rank, an error containing each of ``match``, and nothing that
    the user sees changed: params, momentum, grad_norm, skipped_steps."""
    before = local_copies(params)
    try:
        step()
    except RuntimeError as e:
        for m in match:
            assert m in str(e), f"{m!r} not in: {e}"
    else:
        raise AssertionError("the step was not refused")
    for p, b in zip(local_copies(params), before):
        assert torch.equal(p, b), "a refused step changed a param"
    assert not any(st.get("momentum_buffer") is not None for st in opt.state.values()), \
        "a refused step stored momentum"
    assert opt.grad_norm is None, "a refused step set grad_norm"
    assert opt.skipped_steps is None or opt.skipped_steps.item() == 0, "a refused step counted"


def full_batch_grads(model, s):
    """Every rank holds the full-batch gradient (as after DDP)."""
    model.zero_grad()
    x, y = batch(s)
    loss_fn(model, x, y, s, unused=False).backward()


@scenario
def partition_by_hand(backend):
    """Each rank steps its half of the params, no wrapper: refused without process_group (the
    ranks' sums differ), the full-batch result with it, each rank's own norm with 'local'."""
    def mine(model):
        return [p for i, p in enumerate(model.parameters()) if i % WORLD == RANK]

    model = Net()
    opt = SNGM(mine(model), backend=backend, **ONE_GROUP)
    full_batch_grads(model, 0)
    assert_refused(opt, list(model.parameters()), opt.step,
                   ["different gradients", "process_group=", "DeepSpeed", "FSDP1",
                    "ZeroRedundancyOptimizer", "'local'"])

    model = Net()
    opt = SNGM(mine(model), backend=backend, process_group=dist.group.WORLD, **ONE_GROUP)
    ref = oracle(backend, one_group=True, unused=False)
    my_names = {n for i, (n, _) in enumerate(model.named_parameters()) if i % WORLD == RANK}
    for s in range(STEPS):
        full_batch_grads(model, s)
        opt.step()
        for i, p in enumerate(model.parameters()):  # each rank hands out the half it stepped
            dist.broadcast(p.data, src=i % WORLD)
        got = snapshot_plain(model, opt)
        for n in my_names:
            close(got[n][0], ref[s][n][0], f"partition step {s}: param {n}")
            close(got[n][1], ref[s][n][1], f"partition step {s}: momentum of {n}", MOMENTUM_TOL)
        check_norm(ref[s], opt, f"partition step {s}")

    model = Net()
    ps = mine(model)
    opt = SNGM(ps, backend=backend, process_group="local", **ONE_GROUP)
    full_batch_grads(model, 0)
    want = torch.stack([(p.grad + ONE_GROUP["weight_decay"] * p).double().square().sum()
                        for p in ps]).sum().sqrt()
    with CountCollectives() as c:
        opt.step()
    assert not c.calls, f"process_group='local' communicated: {c.calls}"
    close(opt.grad_norm, want, "process_group='local': this rank's own norm", NORM_TOL)


def _fp64_grads(named, step, scale):
    """The same fp64 grads on every rank (seeded by step and name), times scale (a power of 2)."""
    out = {}
    for i, (n, p) in enumerate(named):
        g = torch.Generator().manual_seed(1000 * step + i)
        out[n] = (torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.5) * scale
    return out


@scenario
def fp64_any_scale(backend):
    """fp64 grads times 2^k, k = +-1000 (far beyond where an fp64 square fits a double), give the
    same bits as k = 0 across ranks: for a partition with process_group (the sums summed over
    the group) and for FSDP2's DTensors (the sums weighted per placement): the three rows of sums
    (scaled_norm.py) cross the collective as they are, and every rank sees the same norm."""
    from torch.distributed.tensor import distribute_tensor

    def partition(k):
        model = Net().double()
        ps = [p for i, p in enumerate(model.parameters()) if i % WORLD == RANK]
        opt = SNGM(ps, backend=backend, process_group=dist.group.WORLD, lr=0.1, momentum=0.9)
        norms = []
        for s in range(2):
            for n, p in model.named_parameters():
                p.grad = _fp64_grads(model.named_parameters(), s, 2.0 ** k)[n]
            opt.step()
            norms.append(opt.grad_norm.item())
        return [p.detach().clone() for p in ps], norms

    def fsdp2(k):
        model = fsdp_model(dtype=torch.float64)
        opt = SNGM(model.parameters(), backend=backend, lr=0.1, momentum=0.9)
        norms = []
        for s in range(2):
            grads = _fp64_grads(model.named_parameters(), s, 2.0 ** k)
            for n, p in model.named_parameters():
                p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements)
            opt.step()
            norms.append(opt.grad_norm.item())
        return [p.to_local().clone() for p in model.parameters()], norms

    for run, what in ((partition, "partition"), (fsdp2, "FSDP2")):
        base, base_norms = run(0)
        assert_same_on_every_rank([torch.tensor(base_norms)], f"{what}: the norms")
        for k in (-1000, 1000):
            got, norms = run(k)
            for a, b in zip(got, base):
                assert torch.equal(a, b), f"{what}, grads x 2^{k}: another step than x 1"
            assert norms == [math.ldexp(n, k) for n in base_norms], (what, k, norms, base_norms)


@scenario
def ddp_with_process_group_is_refused(backend):
    """Under DDP every rank holds the same gradient: a process_group would count it W times."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net()
    ddp = DDP(model)
    opt = SNGM(model.parameters(), backend=backend, process_group=dist.group.WORLD, **ONE_GROUP)
    x, y = local_batch(0, RANK, WORLD)
    loss_fn(ddp, x, y, 0, unused=False).backward()
    assert_refused(opt, list(model.parameters()), opt.step,
                   ["process_group was given", "same gradient", "Leave process_group unset"])


# ---------------------------------------------------------------- tensor parallel


class TPNet(nn.Module):
    """A tensor-parallel block as users write one: a LayerNorm left unparallelized (plain params on
    every rank), a ColwiseParallel w1 and a RowwiseParallel w2, whose bias stays Replicate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.norm = nn.LayerNorm(6)
        self.w1 = nn.Linear(6, 8)
        self.w2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.w2(torch.tanh(self.w1(self.norm(x))))


def tp_groups(model):
    """Weights with weight decay; biases and the norm's params with Nesterov and their own lr."""
    return [
        dict(params=[model.w1.weight, model.w2.weight], lr=0.1, momentum=0.9, weight_decay=1e-2),
        dict(params=[model.norm.weight, model.norm.bias, model.w1.bias, model.w2.bias], lr=0.05,
             momentum=0.8, weight_decay=1e-3, nesterov=True),
    ]


def tp_batch(step):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)


@functools.lru_cache(maxsize=None)
def tp_oracle(backend, norm="global"):
    model = TPNet()
    opt = SNGM(tp_groups(model), backend=backend, norm=norm, process_group=LOCAL)
    history = []
    for s in range(STEPS):
        opt.zero_grad()
        x, y = tp_batch(s)
        absolute = absolute_grad_norm(
            model, lambda b: nn.functional.mse_loss(model(x[b:b + 1]), y[b:b + 1]) / len(x), len(x))
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        check_summation_condition(absolute, opt, f"single-process TP step {s}")
        history.append(snapshot_plain(model, opt))
        history[-1]["grad_norm"] = opt.grad_norm.clone()
    return history


def tp_model(tp_mesh):
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    model = TPNet()
    parallelize_module(model, tp_mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    return model


def snapshot_any(model, opt):
    """Full params and momentum, DTensor or not (all-gathers: every rank calls it)."""
    from sngm_ext.distributed import is_dtensor

    def full(t):
        return t.full_tensor() if is_dtensor(t) else t.detach()

    out = {}
    for n, p in model.named_parameters():
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        if buf is not None and is_dtensor(p):
            assert is_dtensor(buf) and buf.placements == p.placements, \
                f"momentum of {n} is not laid out like its param"
        out[n] = (full(p).clone(), None if buf is None else full(buf).clone())
    return out


def _tp_run(backend, norm, mesh, tp_mesh, dp_rank=0, dp_size=1):
    """TP (and FSDP2 over it when ``mesh`` is 2-D): the full-batch result, the same norm
    bitwise on every rank, and ONE gather per step."""
    from torch.distributed.fsdp import fully_shard

    model = tp_model(tp_mesh)
    if dp_size > 1:
        fully_shard(model, mesh=mesh["dp"])
    opt = SNGM(tp_groups(model), backend=backend, norm=norm)
    plan = opt._dist_plan()
    assert plan.needs_per_tensor_sums, "a Replicate bias beside shards needs per-tensor sums"
    ref = tp_oracle(backend, norm)
    n_params = len(list(model.parameters()))
    plain = any(not hasattr(p, "device_mesh") for p in model.parameters())
    for s in range(STEPS):
        opt.zero_grad()
        x, y = tp_batch(s)
        n = BATCH // dp_size
        x, y = x[dp_rank * n:(dp_rank + 1) * n], y[dp_rank * n:(dp_rank + 1) * n]
        nn.functional.mse_loss(model(x), y).backward()
        with CountCollectives() as c:
            opt.step()
        per = 3 * (1 + n_params if norm == "tensor" else 1) + (3 if plain and s == 0 else 0)
        assert c.calls == [(GATHER, WORLD * per)], f"step {s}: {c.calls}"
        check_against(ref[s], snapshot_any(model, opt), f"TP norm={norm} step {s}")
        check_norm(ref[s], opt, f"TP norm={norm} step {s}")


@scenario
def tp_replicate_bias_plain_norm(backend):
    """TP 1 x WORLD: w2's Replicate bias and the plain LayerNorm each counted once."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    _tp_run(backend, "global", mesh, mesh)


@scenario
def tp_tensor_norm(backend):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    _tp_run(backend, "tensor", mesh, mesh)


@scenario
def tp_plain_param_that_differs_is_refused(backend):
    """A plain param beside DTensors is counted once for the mesh: it must be the same on every
    rank. One whose grad differs (a norm layer in a sequence-parallel region, say) is refused."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    model = tp_model(mesh)
    opt = SNGM(tp_groups(model), backend=backend)
    x, y = tp_batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    model.norm.weight.grad[0] += RANK  # ranks disagree
    assert_refused(opt, list(model.parameters()), opt.step,
                   ["plain-tensor param", "DTensor", "same on every rank"])


@scenario
def fsdp2_tp_2x2(backend):
    """FSDP2 over TP on a (dp=2, tp=2) mesh: 2-D shards (_StridedShard over Shard), w2's bias
    (Shard, Replicate), the LayerNorm sharded over dp only."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, WORLD // 2), mesh_dim_names=("dp", "tp"))
    _tp_run(backend, "global", mesh, mesh["tp"], dp_rank=mesh["dp"].get_local_rank(), dp_size=2)


@scenario
def hsdp_2x2(backend):
    """HSDP on a (replicate=2, shard=2) mesh: every rank its quarter of the batch."""
    _fsdp_run(backend, "global", replicas=2, what="HSDP 2x2")


# ---------------------------------------------------------------- FSDP1


def _fsdp1(use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = Net()
    return model, FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)


def _fsdp1_run(backend, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model, fsdp = _fsdp1(use_orig_params)
    # flat params: one group; the original params (use_orig_params=True): SNGM's usual groups
    params = param_groups(model) if use_orig_params else fsdp.parameters()
    kwargs = {} if use_orig_params else ONE_GROUP
    opt = SNGM(params, backend=backend, process_group=fsdp.process_group, **kwargs)
    ref = oracle(backend, unused=False, one_group=not use_orig_params)
    for s in range(STEPS):
        opt.zero_grad()
        x, y = local_batch(s, RANK, WORLD)
        loss_fn(fsdp, x, y, s, unused=False).backward()
        opt.step()
        with FSDP.summon_full_params(fsdp):
            for n, p in model.named_parameters():
                close(p.detach(), ref[s][n][0], f"FSDP1 use_orig_params={use_orig_params} "
                      f"step {s}: param {n}")
        check_norm(ref[s], opt, f"FSDP1 use_orig_params={use_orig_params} step {s}")


@scenario
def fsdp1_flat_params(backend):
    _fsdp1_run(backend, False)


@scenario
def fsdp1_orig_params(backend):
    _fsdp1_run(backend, True)


@scenario
def fsdp1_without_process_group_is_refused(backend):
    for use_orig_params in (False, True):
        model, fsdp = _fsdp1(use_orig_params)
        opt = SNGM(fsdp.parameters(), backend=backend, **ONE_GROUP)
        x, y = local_batch(0, RANK, WORLD)
        loss_fn(fsdp, x, y, 0, unused=False).backward()
        assert_refused(opt, list(fsdp.parameters()), opt.step,
                       ["FSDP1", "process_group=fsdp_model.process_group"])
    opt = SNGM(fsdp.parameters(), backend=backend, process_group=fsdp.process_group,
               norm="tensor")
    try:
        opt.step()
    except ValueError as e:
        assert "norm='tensor' under FSDP1" in str(e), e
    else:
        raise AssertionError("norm='tensor' was accepted on FSDP1's flat shards")


# ---------------------------------------------------------------- DeepSpeed ZeRO


def _deepspeed(backend, stage, **sngm_kwargs):
    import importlib
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    # DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op on first use (~20 s on
    # 2 cores) that only its inference_all_reduce calls; ZeRO reduces through torch.distributed.
    # (The module by its name: the attribute deepspeed.comm.torch is torch itself.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    model = Net()
    # One param group: DeepSpeed's ZeRO-1/2 step the wrapped optimizer one group at a time
    opt = SNGM(model.parameters(), backend=backend, **ONE_GROUP, **sngm_kwargs)
    # gradient_clipping 0: DeepSpeed would otherwise clip the grads to norm 1 before SNGM sees them
    config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // WORLD,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return model, engine, opt


def _deepspeed_run(backend, stage):
    model, engine, opt = _deepspeed(backend, stage, process_group=dist.group.WORLD)
    ref = oracle(backend, unused=False, one_group=True)
    for s in range(STEPS):
        x, y = local_batch(s, RANK, WORLD)
        engine.backward(loss_fn(engine, x, y, s, unused=False))
        engine.step()
        for n, p in model.named_parameters():
            close(p.detach(), ref[s][n][0], f"DeepSpeed ZeRO-{stage} step {s}: param {n}")
        check_norm(ref[s], opt, f"DeepSpeed ZeRO-{stage} step {s}")


@scenario
def deepspeed_zero1(backend):
    _deepspeed_run(backend, 1)


@scenario
def deepspeed_zero2(backend):
    _deepspeed_run(backend, 2)


@scenario
def deepspeed_without_process_group_is_refused(backend):
    model, engine, opt = _deepspeed(backend, 2)
    x, y = local_batch(0, RANK, WORLD)
    engine.backward(loss_fn(engine, x, y, 0, unused=False))
    assert_refused(opt, list(model.parameters()), engine.step,
                   ["different gradients", "DeepSpeed ZeRO-1/2: process_group="])


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
