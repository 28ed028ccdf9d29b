"""Bad input never half-applies or silently skips a step (issue 21): each refusal names the
problem and leaves params, grads, optimizer state, param groups, skipped_steps and grad_norm
exactly as they were, on every backend; SGD's contract where SNGM does the same thing."""

import copy
import warnings

import pytest
import torch

import sngm_ext
from sngm_ext import SNGM

P = lambda *s: torch.nn.Parameter(torch.randn(*s))  # noqa: E731


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to_dense().clone() if x.is_sparse else x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return copy.copy(x)


def snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return dict(
        params=[_clone(p) for p in params],
        grads=[None if p.grad is None else _clone(p.grad) for p in params],
        state={i: _clone(opt.state[p]) for i, p in enumerate(params) if p in opt.state},
        groups=[{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        skipped=None if opt.skipped_steps is None else _clone(opt.skipped_steps),
        grad_norm=None if opt.grad_norm is None else _clone(opt.grad_norm),
    )


def same(a, b):
    """Bitwise equality of two snapshots (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and (a.device.type == "meta" or torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def trained(backend, momentum=0.9, steps=2):
    """An optimizer over three params after ``steps`` steps, with fresh grads for the next."""
    torch.manual_seed(0)
    ps = [P(2, 3), P(4), P(3, 2)]
    opt = SNGM(ps, lr=0.1, momentum=momentum, weight_decay=1e-2, backend=backend)
    for _ in range(steps + 1):
        for p in ps:
            p.grad = torch.randn_like(p)
        if _ < steps:
            opt.step()
    return ps, opt


def refused(opt, act, exc, match):
    """``act()`` raises ``exc`` matching ``match`` and leaves ``opt`` exactly as it was."""
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        act()
    assert same(snapshot(opt), before)


# ---------------------------------------------------------------- what a step reads

def test_a_momentum_buffer_on_the_meta_device_is_refused(backend):
    ps, opt = trained(backend)
    opt.state[ps[0]]["momentum_buffer"] = torch.zeros(2, 3, device="meta")
    refused(opt, opt.step, ValueError, "meta")


@pytest.mark.parametrize("shape", [(3, 2), (1, 6), (2, 3, 1), (6,)])
def test_a_momentum_buffer_of_another_shape_is_refused(backend, shape):
    ps, opt = trained(backend)
    opt.state[ps[0]]["momentum_buffer"] = torch.zeros(shape)
    refused(opt, opt.step, ValueError, "momentum buffer")


def test_a_momentum_buffer_that_is_not_a_tensor_is_refused(backend):
    ps, opt = trained(backend)
    opt.state[ps[1]]["momentum_buffer"] = "zeros"
    refused(opt, opt.step, TypeError, "momentum buffer")


def test_a_grad_of_the_right_numel_but_another_shape_is_refused(backend):
    ps, opt = trained(backend)
    ps[0].grad.data = torch.arange(6.0).reshape(3, 2)  # what .data allows and SGD refuses
    refused(opt, opt.step, ValueError, "grad")


@pytest.mark.parametrize("bad", ["broadcast", "dtype", "sparse"])
def test_a_bad_grad_on_a_later_param_changes_no_earlier_one(backend, bad):
    """The reference backend used to update the first params before it met the bad grad."""
    ps, opt = trained(backend)
    if bad == "broadcast":
        ps[2].grad.data = torch.ones(2)  # (2,) for a (3, 2) param: would broadcast
    elif bad == "dtype":
        ps[2].grad.data = ps[2].grad.double()  # an fp64 grad on an fp32 param
    else:
        ps[2].grad = torch.zeros(3, 2).to_sparse()
    refused(opt, opt.step, RuntimeError if bad == "sparse" else ValueError,
            "sparse" if bad == "sparse" else "grad")


def test_the_functional_step_refuses_a_meta_grad():
    w = torch.randn(2, 3)
    before = w.clone()
    with pytest.raises(ValueError, match="grad"):
        sngm_ext.sngm([w], [torch.zeros(2, 3, device="meta")], [None], lr=0.1)
    assert torch.equal(w, before)


def test_a_step_without_grads_reports_a_zero_norm(backend):
    ps, opt = trained(backend)
    opt.step()
    assert opt.grad_norm > 0
    opt.zero_grad(set_to_none=True)
    before = snapshot(opt)
    opt.step()
    assert opt.grad_norm.item() == 0.0 and opt.grad_norm.dtype == torch.float64
    after = snapshot(opt)
    before.pop("grad_norm"), after.pop("grad_norm")
    assert same(after, before)  # and nothing else moved


def test_deepspeed_stepping_one_group_at_a_time_is_refused(backend):
    """DeepSpeed ZeRO 1/2 (stage_1_and_2.py, _optimizer_step) sets ``optimizer.param_groups =
    [group]`` and steps once per group: each group would get its own norm."""
    torch.manual_seed(0)
    a, b = P(3), P(4)
    opt = SNGM([{"params": [a]}, {"params": [b], "lr": 0.05}], lr=0.1, backend=backend)
    for p in (a, b):
        p.grad = torch.randn_like(p)
    opt.step()
    original = opt.param_groups
    opt.param_groups = [original[1]]
    refused(opt, opt.step, ValueError, "DeepSpeed")
    opt.param_groups = original
    opt.step()  # the whole set again: fine
    opt.param_groups = [original[0]]
    with pytest.raises(ValueError, match="1 of its 2"):
        opt.step()


def test_a_first_step_inside_a_cuda_graph_capture_is_refused(backend, monkeypatch):
    """Momentum buffers or the counter made inside a capture would be zeroed by every replay."""
    import sngm_ext.device_cache as device_cache

    ps, opt = trained(backend, steps=0)
    monkeypatch.setattr(device_cache, "_capturing", lambda device: True)
    refused(opt, opt.step, RuntimeError, "eager step before capturing")
    monkeypatch.undo()
    opt.step()
    monkeypatch.setattr(device_cache, "_capturing", lambda device: True)
    opt.step()  # warmed up: buffers and counter exist, nothing is created in the capture


# ---------------------------------------------------------------- load_state_dict

def _loaded(backend, edit):
    ps, opt = trained(backend)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    return opt, sd


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.__setitem__("sngm", {}), "skipped_steps"),
    (lambda sd: sd.__setitem__("sngm", {"skipped_steps": torch.tensor(2.5)}), "integer"),
    (lambda sd: sd.__setitem__("sngm", {"skipped_steps": -1}), ">= 0"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(5)), "momentum buffer"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.zeros(3, 2)), "momentum buffer"),
    (lambda sd: sd["state"][0].__setitem__("momentum_buffer", torch.full((2, 3), float("nan"))),
     "NaN"),
    (lambda sd: sd["state"][1].__setitem__("momentum_buffer", "zeros"), "momentum buffer"),
    (lambda sd: sd["param_groups"][0].pop("momentum"), "momentum"),
    (lambda sd: sd["state"].__setitem__(2, "a buffer"), "not a dict"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", float("inf")), "lr"),
    (lambda sd: sd["param_groups"][0].__setitem__("dampening", 0.1), "dampening"),
])
def test_a_refused_state_dict_leaves_the_optimizer_as_it_was(backend, edit, match):
    opt, sd = _loaded(backend, edit)
    state, groups = opt.state, opt.param_groups
    refused(opt, lambda: opt.load_state_dict(sd), (ValueError, TypeError), match)
    assert opt.state is state and opt.param_groups is groups
    opt.step()  # and the optimizer still steps


def test_an_integer_counter_loads_as_int64(backend):
    opt, sd = _loaded(backend, lambda sd: sd.__setitem__("sngm", {"skipped_steps": 3}))
    opt.load_state_dict(sd)
    assert opt.skipped_steps.dtype == torch.int64 and opt.skipped_steps.item() == 3


# ---------------------------------------------------------------- torch.optim.SGD's contract

def test_momentum_zero_keeps_no_state_as_sgd(backend):
    ps, opt = trained(backend, momentum=0.0)
    sgd = torch.optim.SGD(ps, lr=0.1)
    sgd.step()
    assert opt.state_dict()["state"] == sgd.state_dict()["state"] == {}


@pytest.mark.parametrize("kwargs", [dict(momentum=-0.5), dict(weight_decay=-1.0),
                                    dict(lr=-0.1), dict(lr=torch.tensor([0.1, 0.2]))])
def test_messages_start_as_sgds(kwargs):
    with pytest.raises(ValueError) as sgd_error:
        torch.optim.SGD([P(2)], **{"lr": 0.1, **kwargs})
    with pytest.raises(ValueError) as sngm_error:
        SNGM([P(2)], **{"lr": 0.1, **kwargs})
    assert str(sngm_error.value).startswith(str(sgd_error.value).split(",")[0])


def test_fused_on_meta_params_says_what_sgd_says():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    p.grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
        SNGM([p], lr=0.1, fused=True).step()


def test_state_dict_hooks_see_what_state_dict_returns(backend):
    ps, opt = trained(backend)
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.setdefault("post", copy.deepcopy(sd)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.setdefault("pre", copy.deepcopy(sd)))
    sd = opt.state_dict()
    assert same(seen["post"], sd) and "sngm" in sd and "dampening" in sd["param_groups"][0]
    opt.load_state_dict(sd)
    assert same(seen["pre"], sd)
    assert "dampening" not in opt.param_groups[0]  # SGD's extra keys dropped after the hooks


def test_repr_shows_the_settings():
    text = repr(SNGM([P(2)], lr=0.1, norm="tensor", backend="reference"))
    assert "norm: tensor" in text and "backend: reference" in text
    assert text.startswith("SNGM (") and "Parameter Group 0" in text


def test_settings_are_read_only():
    opt = SNGM([P(2)], lr=0.1)
    with pytest.raises(AttributeError):
        opt.norm = "tensor"  # the step machinery was built for the other one


def test_the_fallback_warning_points_at_the_users_line(monkeypatch):
    import sngm_ext.backends as backends

    def no_native(device):
        raise sngm_ext.BackendUnavailable("no native layer (test)")

    monkeypatch.setattr(backends, "_native_ops", no_native)
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(backends, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SNGM([P(2)], lr=0.1)
    assert [w.filename for w in caught] == [__file__], [(w.filename, w.lineno) for w in caught]
