"""SNGM where code expects torch.optim.SGD: its signature, pickling, older checkpoints, tensor lr,
complex params, hooks, printing (modeled on what torch's test/test_optim.py checks for SGD)."""

import copy
import functools
import io
import pickle

import pytest
import torch

from kit import Problem, Task, assert_equal, mlp, values
from sngm_ext import SNGM, BackendUnavailable

HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


P = Problem(functools.partial(mlp, (6, 12, 2)), Task((16, 6), (16, 2), seed=500))


# ---------------------------------------------------------------- torch.optim.SGD's signature


def test_sgd_positional_order_means_the_same(backend):
    """SGD(params, lr, momentum, dampening, weight_decay, nesterov): the same positions."""
    a, b = P.model(), P.model()
    oa = SNGM(a.parameters(), 0.1, 0.9, 0, 1e-3, True, backend=backend)
    ob = SNGM(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True,
              backend=backend)
    assert oa.param_groups[0]["weight_decay"] == 1e-3 and oa.param_groups[0]["nesterov"] is True
    P.train(a, oa, 3)
    P.train(b, ob, 3)
    assert_equal(values(a), values(b))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dampening=0.1), "dampening"),
    (dict(differentiable=True), "differentiable"),
    (dict(foreach=True, fused=True), "cannot be `True` together"),
    (dict(fused=False, backend="cpu"), "fused=False"),
    (dict(foreach=True, backend="reference"), "foreach=True"),
    (dict(lr=torch.tensor(float("nan"))), "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    (dict(momentum=torch.tensor(0.9)), "momentum"),
])
def test_what_sgd_code_cannot_mean_here_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SNGM(P.model().parameters(), **{**HYPER, **kwargs})


def test_foreach_and_fused_choose_an_implementation():
    ps = list(P.model().parameters())
    assert SNGM(ps, foreach=False).backend == "reference"  # per tensor
    assert SNGM(ps, fused=False).backend == "reference"
    assert SNGM(ps, foreach=True).backend == "auto"  # the multi-tensor kernels where they run
    opt = SNGM(ps, fused=True)
    assert opt.backend == "auto" and opt._require_fused
    for p in ps:
        p.grad = torch.ones_like(p)
    try:  # fused=True never falls back to the reference: it runs a fused backend or says why
        opt.step()
    except BackendUnavailable as e:
        assert "fused=True" in str(e)


# ---------------------------------------------------------------- pickle, deepcopy, torch.save


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_settings_travel_with_the_optimizer(backend, how):
    """A copy continues exactly as the original does, with SNGM's own settings."""
    m = P.model()
    opt = SNGM(m.parameters(), norm="tensor", backend=backend, nesterov=True, **HYPER)
    P.train(m, opt, 2)
    m2 = copy.deepcopy(m)
    if how == "deepcopy":
        opt2 = copy.deepcopy(opt)
    elif how == "pickle":
        opt2 = pickle.loads(pickle.dumps(opt))
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        opt2 = torch.load(buf, weights_only=False)
    assert (opt2.norm, opt2.backend, opt2.norm_in_backward) == ("tensor", backend, False)
    assert torch.equal(opt2.skipped_steps, opt.skipped_steps)
    # the copy steps its own params (copies), as SGD's does; point them at the copied model's
    for g2, gm in zip(opt2.param_groups, [list(m2.parameters())]):
        state = {q: opt2.state[p] for p, q in zip(g2["params"], gm) if p in opt2.state}
        g2["params"] = gm
        opt2.state.clear()
        opt2.state.update(state)
    P.train(m, opt, 2, start=2)
    P.train(m2, opt2, 2, start=2)
    assert_equal(values(m), values(m2))


def test_deepcopy_copies_every_public_attribute():
    opt = SNGM(P.model().parameters(), norm="tensor", foreach=True, **HYPER)
    opt2 = copy.deepcopy(opt)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(opt2) if not k.startswith("_")}
    for k in public - {"param_groups", "state", "defaults"}:
        assert getattr(opt2, k) == getattr(opt, k), k


def test_deepcopy_with_norm_in_backward_hooks_its_own_params(fused_backend):
    m = P.model()
    opt = SNGM(m.parameters(), backend=fused_backend, norm_in_backward=True, **HYPER)
    P.train(m, opt, 2)
    m2, opt2 = copy.deepcopy((m, opt))  # one memo: opt2 holds m2's params
    P.train(m, opt, 3, start=2)
    P.train(m2, opt2, 3, start=2)
    assert_equal(values(m), values(m2))
    assert opt2._sums.served == 2  # its hooks were attached to m2's params


# ---------------------------------------------------------------- checkpoints


def test_older_state_dicts_are_filled(backend):
    """A state_dict without maximize / nesterov (older torch or SNGM, hand-made) loads and steps."""
    m = P.model()
    opt = SNGM(m.parameters(), backend=backend, **HYPER)
    P.train(m, opt, 2)
    sd = copy.deepcopy(opt.state_dict())  # as a checkpoint would hold it
    for g in sd["param_groups"]:
        del g["maximize"], g["nesterov"]
    m2 = copy.deepcopy(m)
    opt2 = SNGM(m2.parameters(), backend=backend, **HYPER)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["maximize"] is False and opt2.param_groups[0]["nesterov"] is False
    P.train(m, opt, 2, start=2)
    P.train(m2, opt2, 2, start=2)
    assert_equal(values(m), values(m2))


def test_state_dict_round_trips_through_a_weights_only_load(backend):
    m = P.model()
    opt = SNGM(m.parameters(), backend=backend, **HYPER)
    P.train(m, opt, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m2 = copy.deepcopy(m)
    opt2 = SNGM(m2.parameters(), backend=backend, **HYPER)
    opt2.load_state_dict(sd)
    P.train(m, opt, 2, start=2)
    P.train(m2, opt2, 2, start=2)
    assert_equal(values(m), values(m2))


# ---------------------------------------------------------------- tensor lr


def test_tensor_lr_equals_the_float_lr_under_a_scheduler(backend):
    """lr=torch.tensor(0.1) as SGD takes it: the same results as lr=0.1, a scheduler included
    (it writes the tensor in place; the kernels read it where it lies)."""
    runs = []
    for lr in (0.1, torch.tensor(0.1), torch.tensor(0.1, dtype=torch.float64)):
        m = P.model()
        opt = SNGM(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-3, backend=backend)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for s in range(5):
            P.train(m, opt, 1, start=s)
            sched.step()
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == isinstance(lr, torch.Tensor)
        runs.append(values(m))
    assert_equal(runs[0], runs[1])
    for x, y in zip(runs[2], runs[0]):  # an fp64 0.1 rounds to the same fp32 as the float
        assert torch.equal(x, y)


# ---------------------------------------------------------------- complex params, no grads


def test_complex_params_step_as_their_real_views(backend):
    """A complex param is stepped as torch.view_as_real of it (as SGD does); the norm counts real
    and imaginary parts; the momentum buffer has the param's dtype (SGD's state format)."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(7, 3, dtype=torch.complex64, generator=g))
    w = torch.nn.Parameter(torch.randn(5, generator=g))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    w2 = torch.nn.Parameter(w.detach().clone())
    oz = SNGM([z, w], backend=backend, **HYPER)
    orr = SNGM([r, w2], backend=backend, **HYPER)
    for _ in range(3):
        gz = torch.randn(7, 3, dtype=torch.complex64, generator=g)
        gw = torch.randn(5, generator=g)
        z.grad, w.grad = gz, gw
        r.grad, w2.grad = torch.view_as_real(gz).clone(), gw.clone()
        oz.step()
        orr.step()
        torch.testing.assert_close(oz.grad_norm, orr.grad_norm, rtol=0, atol=0)
    assert torch.equal(torch.view_as_real(z.detach()), r.detach()) and torch.equal(w, w2)
    assert oz.state[z]["momentum_buffer"].dtype == torch.complex64


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_step_without_grads_is_a_no_op(backend, device):
    ps = [torch.nn.Parameter(torch.zeros(3, device=device))]
    opt = SNGM(ps, backend=backend, **HYPER)
    assert opt.step() is None and opt.state_dict()["state"] == {}


# ---------------------------------------------------------------- hooks, printing


def test_step_and_state_dict_hooks_run(backend):
    opt = SNGM(P.model().parameters(), backend=backend, **HYPER)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd_post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_printing_shows_the_groups():
    text = repr(SNGM(P.model().parameters(), **HYPER))
    assert text.startswith("SNGM (") and "lr: 0.1" in text and "momentum: 0.9" in text
    assert "_complex" not in text
