"""``SNGM(norm_in_backward=True)``: phase 1 taken in the grad hooks must give the very bits of the
step's own phase 1, be used only when the version counters say nothing else wrote since, and leave
phase 1 to the step in every other case (sngm_ext/backward_sums.py)."""

import pytest
import torch
from torch import nn

import sngm_ext.fused as fused
from sngm_ext import SNGM


def _model(dtype=torch.float32, unused=False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 21), nn.Tanh(), nn.Linear(21, 5))
    if unused:
        m.register_parameter("unused", nn.Parameter(torch.randn(3, 3)))  # never in the graph: grad None
    return m.to(dtype)


def _loss(model, step, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(64, 37, generator=g).to(dtype), torch.randn(64, 5, generator=g).to(dtype)
    return (model(x) - y).square().mean()


@pytest.fixture
def step_sumsq(monkeypatch):
    """Per step, how many phase-1 launches the step itself made (the hooks' are not counted)."""
    calls = []
    real = fused.fused_step

    def counting_step(buckets, groups, ops, **kw):
        class Counting:
            finalize, update = ops.finalize, ops.update

            @staticmethod
            def sumsq(*args):
                calls[-1] += 1
                return ops.sumsq(*args)

        calls.append(0)
        return real(buckets, groups, Counting, **kw)

    monkeypatch.setattr(fused, "fused_step", counting_step)  # looked up per call
    return calls


def _train(backend, flag, steps=4, between=None, dtype=torch.float32, unused=False,
           set_to_none=True, accumulate=1, **kw):
    m = _model(dtype, unused)
    first = list(m[0].parameters())
    rest = [p for p in m.parameters() if all(p is not q for q in first)]
    groups = [dict(params=first, weight_decay=1e-2), dict(params=rest, nesterov=True)]
    opt = SNGM(groups, lr=0.05, momentum=0.9, backend=backend, norm_in_backward=flag, **kw)
    norms = []
    for t in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        for a in range(accumulate):
            _loss(m, t * accumulate + a, dtype).backward()
        if between is not None:
            between(m, opt, t)
        opt.step()
        norms.append(opt.grad_norm.clone())
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in m.parameters() if p in opt.state]
    return [p.detach().clone() for p in m.parameters()] + bufs + norms


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("norm", ["global", "tensor"])
def test_bitwise_the_same_as_phase_one_in_the_step(fused_backend, step_sumsq, dtype, norm):
    on = _train(fused_backend, True, dtype=dtype, norm=norm)
    # the first step builds the buckets (and hooks); from then on the step leaves phase 1 out
    assert step_sumsq == [2, 0, 0, 0]  # two param groups: two buckets
    del step_sumsq[:]
    off = _train(fused_backend, False, dtype=dtype, norm=norm)
    assert step_sumsq == [2, 2, 2, 2]
    _assert_same(on, off)


def test_gradient_accumulation_sums_again_after_each_backward(fused_backend, step_sumsq):
    on = _train(fused_backend, True, accumulate=3)
    assert step_sumsq == [2, 0, 0, 0]
    _assert_same(on, _train(fused_backend, False, accumulate=3))


def _clip(m, opt, t):
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)


def _scale(m, opt, t):  # what GradScaler.unscale_ does: grads rescaled in place
    torch._foreach_mul_([p.grad for p in m.parameters()], 0.5)


def _one_scaled(m, opt, t):
    with torch.no_grad():
        m[2].weight.grad[3].mul_(4.0)


def _grad_by_hand(m, opt, t):
    m[2].bias.grad = m[2].bias.grad * 3


def _weight_decay_changed(m, opt, t):
    opt.param_groups[0]["weight_decay"] = 0.1 * (t + 1)


def _param_moved(m, opt, t):
    with torch.no_grad():
        m[0].weight.add_(0.01)


@pytest.mark.parametrize("between", [_clip, _scale, _one_scaled, _grad_by_hand,
                                     _weight_decay_changed, _param_moved], ids=lambda f: f.__name__)
def test_writes_after_backward_send_phase_one_back_to_the_step(fused_backend, step_sumsq, between):
    on = _train(fused_backend, True, between=between)
    assert step_sumsq[1:] and all(n >= 1 for n in step_sumsq[1:])
    _assert_same(on, _train(fused_backend, False, between=between))


def test_zero_grad_in_place_and_none_grads_fall_back(fused_backend, step_sumsq):
    on = _train(fused_backend, True, set_to_none=False)
    assert step_sumsq == [2, 2, 2, 2]  # zero_() writes every grad before backward
    _assert_same(on, _train(fused_backend, False, set_to_none=False))
    del step_sumsq[:]
    on = _train(fused_backend, True, unused=True)
    assert step_sumsq == [2, 2, 2, 2]  # a None grad: not the layout the hooks sum for
    _assert_same(on, _train(fused_backend, False, unused=True))


def test_only_with_a_fused_backend():
    with pytest.raises(ValueError, match="norm_in_backward=True needs a fused backend"):
        SNGM(_model().parameters(), backend="reference", norm_in_backward=True)


def test_the_cpu_backend_copies_and_sums_in_one_pass(fused_backend):
    """Where the backend has copy_sumsq (the C++ CPU one), the hooks use it; elsewhere a copy and
    a sumsq (the bitwise tests above cover both)."""
    m = _model()
    opt = SNGM(m.parameters(), lr=0.05, backend=fused_backend, norm_in_backward=True)
    _loss(m, 0, torch.float32).backward()
    opt.step()
    sums = opt._buckets.buckets[0].sums
    fused = sums.copy_sumsq is not None
    assert fused == (fused_backend == "cpu")
    calls = []
    if fused:
        real = sums.copy_sumsq
        sums.copy_sumsq = lambda *a: (calls.append(a[4]), real(*a))
    opt.zero_grad()
    _loss(m, 1, torch.float32).backward()
    assert all(sums.fresh)
    assert sorted(calls) == (sorted(opt._buckets.buckets[0].offsets) if fused else [])
