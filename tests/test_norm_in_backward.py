"""``SNGM(norm_in_backward=True)``: phase 1 taken in the grad hooks must give the very bits of the
step's own phase 1, be used only when it provably describes the tensors the step updates, and leave
phase 1 to the step in every other case (sngm_ext/backward_sums.py). Every writer is the real one:
GradScaler, clip_grad_norm_, Module._apply, torch.compile."""

import pytest
import torch
from torch import nn

import sngm_ext.fused as fused
from kit import Task, assert_equal, mlp, train, values
from sngm_ext import SNGM


TASK = Task((64, 37), (64, 5), seed=1000)


def _model(dtype=torch.float32, unused=False):
    m = mlp((37, 300, 21, 5))
    if unused:
        m.register_parameter("unused", nn.Parameter(torch.randn(3, 3)))  # never in the graph: grad None
    return m.to(dtype)


@pytest.fixture
def step_sumsq(monkeypatch):
    """Per step, how many phase-1 launches the step itself made (the hooks' are not counted)."""
    calls = []
    real = fused.fused_step

    def counting_step(groups, ops, **kw):
        class Counting:
            finalize, update = ops.finalize, ops.update

            @staticmethod
            def sumsq(*args):
                calls[-1] += 1
                return ops.sumsq(*args)

        calls.append(0)
        return real(groups, Counting, **kw)

    monkeypatch.setattr(fused, "fused_step", counting_step)  # looked up per call
    return calls


def _train(backend, flag, steps=4, between=None, dtype=torch.float32, unused=False,
           set_to_none=True, accumulate=1, **kw):
    m = _model(dtype, unused)
    first = list(m[0].parameters())
    rest = [p for p in m.parameters() if all(p is not q for q in first)]
    groups = [dict(params=first, weight_decay=1e-2), dict(params=rest, nesterov=True)]
    opt = SNGM(groups, lr=0.05, momentum=0.9, backend=backend, norm_in_backward=flag, **kw)
    norms = train(m, opt, TASK.loss, steps, set_to_none=set_to_none, accumulate=accumulate,
                  between=between)
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in m.parameters() if p in opt.state]
    return values(m) + bufs + norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("norm", ["global", "tensor"])
def test_bitwise_the_same_as_phase_one_in_the_step(fused_backend, step_sumsq, dtype, norm):
    on = _train(fused_backend, True, dtype=dtype, norm=norm)
    # the first step arms the hooks on its layout; from then on the step leaves phase 1 out
    assert step_sumsq == [2, 0, 0, 0]  # two param groups: two lists
    del step_sumsq[:]
    off = _train(fused_backend, False, dtype=dtype, norm=norm)
    assert step_sumsq == [2, 2, 2, 2]
    assert_equal(on, off)


def test_gradient_accumulation_sums_again_after_each_backward(fused_backend, step_sumsq):
    on = _train(fused_backend, True, accumulate=3)
    assert step_sumsq == [2, 0, 0, 0]
    assert_equal(on, _train(fused_backend, False, accumulate=3))


def _clip(m, opt, t):
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)


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


def _grad_data_repointed(m, opt, t):  # what Module._apply does: no version bump
    for p in m.parameters():
        p.grad.data = p.grad.data * 1.5


@pytest.mark.parametrize("between", [_clip, _one_scaled, _grad_by_hand, _weight_decay_changed,
                                     _param_moved, _grad_data_repointed], ids=lambda f: f.__name__)
def test_writes_after_backward_send_phase_one_back_to_the_step(fused_backend, step_sumsq, between):
    on = _train(fused_backend, True, between=between)
    assert step_sumsq[1:] and all(n >= 1 for n in step_sumsq[1:])
    assert_equal(on, _train(fused_backend, False, between=between))


def test_zero_grad_in_place_and_none_grads(fused_backend, step_sumsq):
    on = _train(fused_backend, True, set_to_none=False)
    # zero_() writes before backward; autograd then accumulates in place and the hook sums after
    assert step_sumsq == [2, 0, 0, 0]
    assert_equal(on, _train(fused_backend, False, set_to_none=False))
    del step_sumsq[:]
    on = _train(fused_backend, True, unused=True)
    assert step_sumsq == [2, 0, 0, 0]  # a param that never has a grad is simply not in the lists
    assert_equal(on, _train(fused_backend, False, unused=True))


def test_only_with_a_fused_backend():
    with pytest.raises(ValueError, match="norm_in_backward=True needs a fused backend"):
        SNGM(_model().parameters(), backend="reference", norm_in_backward=True)


def test_hooks_sum_grads_where_they_lie(fused_backend):
    """No copy: after backward each p.grad is autograd's own tensor, and the step was served."""
    m = _model()
    opt = SNGM(m.parameters(), lr=0.05, backend=fused_backend, norm_in_backward=True)
    for t in range(3):
        opt.zero_grad()
        TASK.loss(m, t).backward()
        grads = {p: (p.grad, p.grad.data_ptr()) for p in m.parameters()}
        opt.step()
        assert all(p.grad is g and p.grad.data_ptr() == ptr for p, (g, ptr) in grads.items())
    assert opt._sums.steps == 3 and opt._sums.served == 2


# ---------------------------------------------------------------- the real GradScaler


def _train_amp(backend, flag, weight_decay, unscale=False, inf_at=None, steps=5, scaler=True):
    m = _model()
    opt = SNGM(m.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay, backend=backend,
               norm_in_backward=flag)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaler else None
    norms = []
    for t in range(steps):
        opt.zero_grad()
        loss = TASK.loss(m, t)
        if t == inf_at:
            loss = loss * float("inf")  # every grad non-finite
        if sc is None:
            loss.backward()
            opt.step()
        else:
            sc.scale(loss).backward()
            if unscale:
                sc.unscale_(opt)  # rewrites the grads in place, no version bump
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)  # clips nothing
            sc.step(opt)
            sc.update()
        norms.append(opt.grad_norm.clone())
    return values(m), norms, opt, sc


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("unscale", [False, True])
def test_real_grad_scaler(fused_backend, step_sumsq, weight_decay, unscale):
    """GradScaler's fused path: the same bits as without norm_in_backward, the hooks used only
    where the scale provably cancels (no weight decay, grads still scaled), and an inf step
    skipped on the device; the result is the unscaled run's (a power-of-two scale cancels)."""
    on, on_norms, opt, sc = _train_amp(fused_backend, True, weight_decay, unscale, inf_at=2)
    served = step_sumsq[1:]
    del step_sumsq[:]
    off, off_norms, _, _ = _train_amp(fused_backend, False, weight_decay, unscale, inf_at=2)
    assert_equal(on + on_norms[:2] + on_norms[3:], off + off_norms[:2] + off_norms[3:])
    assert opt.skipped_steps.item() == 1 and sc.get_scale() == 2.0**12 * 0.5
    if weight_decay == 0 and not unscale:
        assert served == [0, 0, 0, 0]  # the inf step too: found_inf skips it on the device
    else:
        assert all(n == 1 for n in served)
    # against a run without GradScaler that skips the same step by hand: the scale (a power of
    # two) multiplies every value of the scaled backward exactly and g * fl32(1 / scale) divides it
    # out exactly (no grad near fp32's subnormal range here), so the same bits
    ref, ref_norms, _, _ = _train_amp(fused_backend, False, weight_decay, inf_at=2, scaler=False)
    assert_equal(on + on_norms[:2] + on_norms[3:], ref + ref_norms[:2] + ref_norms[3:])


# ---------------------------------------------------------------- Module._apply, torch.compile


def test_model_double_after_steps(fused_backend, step_sumsq):
    """model.double() between steps: momentum follows the params' dtype, the hooks' fp32 layout
    is dropped, and the result is the run without norm_in_backward."""
    def go(flag):
        m = _model()
        opt = SNGM(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                   backend=fused_backend, norm_in_backward=flag)
        for t in range(4):
            if t == 2:
                m.double()
            opt.zero_grad()
            TASK.loss(m, t).backward()
            opt.step()
        assert all(opt.state[p]["momentum_buffer"].dtype == torch.float64 for p in m.parameters())
        return values(m)
    on = go(True)
    assert step_sumsq == [1, 0, 1, 0]
    assert_equal(on, go(False))


def test_compiled_step(fused_backend):
    """torch.compile(opt.step): traced through the ops' fake kernels; the traced step sums phase
    1 itself, and equals the eager step without norm_in_backward."""
    def go(flag, compiled):
        m = _model()
        opt = SNGM(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                   backend=fused_backend, norm_in_backward=flag)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for t in range(3):
            opt.zero_grad()
            TASK.loss(m, t).backward()
            step()
        return values(m)
    torch._dynamo.reset()
    assert_equal(go(True, True), go(False, False))
