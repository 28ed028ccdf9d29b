"""The optimizer as users drive it: API, errors that change nothing, checkpoints, view breakage."""

import copy
import functools
import os
import subprocess
import sys

import pytest
import torch

import sngm_ext
from bounds import elementwise_bounds, norm_rtol, step_error_bounds
from kit import Magnitudes, Problem, Task, assert_runs_close, assert_same, assert_within, mlp, \
    snapshot
from sngm_ext import SNGM


P = Problem(functools.partial(mlp, (8, 16, 3), act=torch.nn.ReLU), Task((32, 8), 3, seed=1000))


# ---------------------------------------------------------------- hyper-parameters


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr=-0.1), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=1e39), "lr"),  # finite, but inf in the fp32 the kernels compute in
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(momentum=0.0, nesterov=True), "nesterov"),
        (dict(backend="tpu"), "backend"),
        (dict(norm="layer"), "norm"),
    ],
)
def test_bad_hyperparameters_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SNGM(P.model().parameters(), **{"lr": 0.1, **kwargs})


def test_unsupported_param_dtypes_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        SNGM([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))], lr=0.1)


def test_params_on_several_devices_are_refused():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device"):
        SNGM([a, b], lr=0.1)
    opt = SNGM([a], lr=0.1)
    with pytest.raises(ValueError, match="one device"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- errors change nothing


def test_sparse_grad_is_refused_and_changes_nothing(backend):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, backend=backend)
    P.train(m, opt, 2)
    before = snapshot(m, opt)
    x, y = P.batch(5)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    ps = list(m.parameters())
    ps[-1].grad = ps[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_same(before, snapshot(m, opt))


@pytest.mark.parametrize("key, value", [("momentum", 1.5), ("lr", float("inf")),
                                        ("weight_decay", float("nan"))])
def test_bad_group_value_set_later_is_refused_and_changes_nothing(backend, key, value):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, backend=backend)
    P.train(m, opt, 2)
    before = snapshot(m, opt)
    opt.param_groups[0][key] = value
    x, y = P.batch(5)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match=key):
        opt.step()
    assert_same(before, snapshot(m, opt))
    opt.param_groups[0][key] = 0.1 if key != "momentum" else 0.9  # repaired: steps go on
    opt.step()
    assert torch.isfinite(opt.grad_norm) and opt.skipped_steps.item() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step_on_device(backend, bad):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, weight_decay=1e-4, backend=backend)
    P.train(m, opt, 2)
    before = snapshot(m, opt)
    x, y = P.batch(7)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    next(m.parameters()).grad[0, 0] = bad
    opt.step()
    assert_same(before, snapshot(m, opt))
    assert opt.skipped_steps.item() == 1
    assert not torch.isfinite(opt.grad_norm)
    P.train(m, opt, 1, start=8)  # and training goes on
    assert opt.skipped_steps.item() == 1 and torch.isfinite(opt.grad_norm)


def test_unavailable_backend_says_why():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.raises(sngm_ext.BackendUnavailable, match="cuda"):
        SNGM([p], lr=0.1, backend="cuda").step()
    assert torch.equal(p.detach(), torch.zeros(3))
    code = (
        "import torch, sngm_ext\n"
        "p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.ones(3)\n"
        "try:\n"
        "    sngm_ext.SNGM([p], lr=0.1, backend='triton').step()\n"
        "except sngm_ext.BackendUnavailable as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stderr


# ---------------------------------------------------------------- no host sync


class _NoSync:
    """Fails the test if step() reads a tensor's value on the host."""

    NAMES = ["item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"]

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def boom(name):
            def f(*a, **k):
                raise AssertionError(f"host sync in step(): Tensor.{name}")
            return f

        for n in self.NAMES:
            setattr(torch.Tensor, n, boom(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_step_reads_nothing_back_to_the_host(backend):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, backend=backend)
    P.train(m, opt, 1)  # the first step builds the tables and the momentum buffers
    x, y = P.batch(3)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    with _NoSync():
        opt.step()
    assert opt.grad_norm.dim() == 0 and opt.grad_norm.device == x.device


# ---------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_continues_exactly(backend):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
    P.train(m, opt, 3)
    saved_model = copy.deepcopy(m.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    P.train(m, opt, 3, start=3)
    straight = snapshot(m, opt)

    m2 = P.model(seed=1)
    m2.load_state_dict(saved_model)
    opt2 = SNGM(m2.parameters(), lr=0.5, momentum=0.5, backend=backend)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 0.1
    P.train(m2, opt2, 3, start=3)
    assert_same(straight, snapshot(m2, opt2))


def test_sngm_checkpoint_loads_into_sgd_and_back(backend):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    P.train(m, opt, 2)
    sgd = torch.optim.SGD(m.parameters(), lr=1.0)
    sgd.load_state_dict(opt.state_dict())
    for p in m.parameters():
        assert torch.equal(sgd.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    P.train(m, sgd, 1, start=2)  # SGD runs on it

    sngm = SNGM(m.parameters(), lr=0.3, backend=backend)
    sngm.load_state_dict(sgd.state_dict())
    bufs = {p: sgd.state[p]["momentum_buffer"].clone() for p in m.parameters()}
    x, y = P.batch(9)
    sngm.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    grads = {p: p.grad.clone() for p in m.parameters()}
    before = {p: p.detach().clone() for p in m.parameters()}
    sngm.step()
    ps = list(m.parameters())
    ds = [grads[p].double() for p in ps]
    n = torch.sqrt(sum(d.square().sum() for d in ds)).item()
    # one step in fp32 from the same stored values, against fp64 by hand: bounds.step_error_bounds
    bound = step_error_bounds(torch.float32, lr=0.1, beta=0.9, wd=0.0, nesterov=False,
                              ws=[before[p].double() for p in ps], ds=ds,
                              us=[bufs[p].double() for p in ps], n=n)
    for i, p in enumerate(ps):  # the step continues SGD's momentum, SNGM's way
        u = 0.9 * bufs[p].double() + ds[i] / n
        assert_within(sngm.state[p]["momentum_buffer"], u, bound.momentum[i], f"momentum {i}")
        assert_within(p, before[p].double() - 0.1 * u, bound.params[i], f"param {i}")


def test_sgd_checkpoint_with_dampening_is_refused():
    m = P.model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    P.train(m, sgd, 1)
    opt = SNGM(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="dampening"):
        opt.load_state_dict(sgd.state_dict())


# ---------------------------------------------------------------- what users do to tensors


def test_zero_grad_modes_params_reassigned_and_grads_replaced(backend):
    """zero_grad in both modes, ``p.data = ...``, grads replaced by new tensors: the result is the
    reference's."""

    def drive(be):
        m = P.model()
        opt = SNGM(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=be)
        mags = Magnitudes(opt)
        P.train(m, opt, 2, set_to_none=True)
        P.train(m, opt, 2, start=2, set_to_none=False)
        m.zero_grad()
        P.train(m, opt, 1, start=4)
        first = next(m.parameters())
        first.data = first.detach().clone() * 0.5  # p.data = ... gives the param new memory
        P.train(m, opt, 1, start=5, set_to_none=False)
        for p in m.parameters():  # grads replaced by new tensors
            p.grad = torch.ones_like(p)
        opt.step()
        return snapshot(m, opt), mags

    ref, mags = drive("reference")
    got, _ = drive(backend)
    assert_runs_close(got.params, ref.params, mags, torch.float32)
    assert got.state.keys() == ref.state.keys() == set(range(len(ref.params)))
    assert_runs_close([got.state[k]["momentum_buffer"] for k in sorted(got.state)],
                      [ref.state[k]["momentum_buffer"] for k in sorted(ref.state)], mags,
                      torch.float32, momentum=True)


def test_closure_lr_scheduler_and_added_group(backend):
    def drive(be):
        m = P.model()
        head = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(head.weight, 0.1)
        opt = SNGM(m.parameters(), lr=0.2, momentum=0.9, backend=be)
        mags = Magnitudes(opt)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for s in range(5):
            if s == 2:
                opt.add_param_group({"params": head.parameters(), "lr": 0.05, "nesterov": True})
            x, y = P.batch(s)

            seen = []

            def closure():
                opt.zero_grad()
                out = m(x) if s < 2 else head(m(x))
                loss = torch.nn.functional.cross_entropy(out, y % 2 if s >= 2 else y)
                loss.backward()
                seen.append(loss)
                return loss

            assert opt.step(closure) is seen[0] and len(seen) == 1  # SGD's: the closure's loss
            sched.step()
        return [p.detach().clone() for p in list(m.parameters()) + list(head.parameters())], mags

    ref, mags = drive("reference")
    got, _ = drive(backend)
    assert_runs_close(got, ref, mags, torch.float32)


def test_params_without_grad_are_untouched(backend):
    m = P.model()
    frozen = list(m.parameters())[0]
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = SNGM(m.parameters(), lr=0.1, weight_decay=0.1, backend=backend)
    P.train(m, opt, 3)
    assert torch.equal(frozen, before)
    assert frozen not in opt.state or "momentum_buffer" not in opt.state[frozen]


def test_functional_entry_point(backend):
    torch.manual_seed(0)
    ps = [torch.randn(5), torch.randn(3, 2)]
    gs = [torch.randn(5), torch.randn(3, 2)]
    bufs = [None, None]
    ref_ps = [p.clone() for p in ps]
    ref_bufs = [None, None]
    before = [p.abs().max().item() for p in ps]
    n = sngm_ext.sngm(ps, gs, bufs, lr=0.1, momentum=0.9, backend=backend)
    n_ref = sngm_ext.sngm(ref_ps, gs, ref_bufs, lr=0.1, momentum=0.9, backend="reference")
    # one step on the same inputs: the norm's summation order alone (bounds.elementwise_bounds)
    torch.testing.assert_close(n, n_ref, rtol=norm_rtol(torch.float32, 0, 11), atol=0)
    for i, (a, b, u, ref_u) in enumerate(zip(ps, ref_ps, bufs, ref_bufs)):
        du, dw = elementwise_bounds(torch.float32, 1, 0.1, 0.9,
                                    max(before[i], b.abs().max().item()), ref_u.abs().max().item(),
                                    11)
        assert_within(a, b.double(), dw, f"param {i}")
        assert_within(u, ref_u.double(), du, f"momentum {i}")
    with pytest.raises(ValueError, match="lr"):
        sngm_ext.sngm(ps, gs, bufs, lr=-1.0)


def test_functional_refuses_params_on_several_devices(backend):
    ps = [torch.zeros(3), torch.zeros(3, device="meta")]
    gs = [torch.ones(3), torch.ones(3, device="meta")]
    with pytest.raises(ValueError, match="one device"):
        sngm_ext.sngm(ps, gs, [None, None], lr=0.1, backend=backend)
    assert torch.equal(ps[0], torch.zeros(3))


@pytest.mark.parametrize("group, match", [
    (lambda m: {"params": [torch.nn.Parameter(torch.zeros(3))], "momentum": 1.0}, "momentum"),
    (lambda m: {"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.complex32))]}, "dtype"),
    (lambda m: {"params": [next(m.parameters())]}, "more than one parameter group|given twice"),
])
def test_a_refused_param_group_leaves_the_optimizer_as_it_was(backend, group, match):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, backend=backend)
    P.train(m, opt, 1)
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(group(m))
    assert len(opt.param_groups) == n_groups
    P.train(m, opt, 1, start=1)  # still steps


def test_a_momentum_buffer_of_another_size_is_refused_and_changes_nothing(backend):
    """A buffer that is not its param's size (a hand-edited or mismatched checkpoint): refused by
    name before anything is written (a kernel would write past one of them)."""
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    P.train(m, opt, 1)
    p = next(m.parameters())
    opt.state[p]["momentum_buffer"] = torch.zeros(p.numel() + 3)
    before = snapshot(m, opt)
    x, y = P.batch(7)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="momentum buffer of shape"):
        opt.step()
    assert_same(before, snapshot(m, opt))
