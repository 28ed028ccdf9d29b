"""The step the way modern loops run it: the real torch.amp.GradScaler (SNGM takes its fused path),
torch.compile(opt.step) with fullgraph=True, and what can be seen on CPU of a capturable step
(nothing built or uploaded in a steady loop). Every backend that runs on CPU."""

import functools

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from bounds import stored_step_bound
from kit import Problem, Task, assert_equal, mlp, values
from sngm_ext import SNGM


P = Problem(functools.partial(mlp, (12, 32, 3)), Task((24, 12), (24, 3), seed=300))


# ---------------------------------------------------------------- GradScaler


def _train(backend, weight_decay, scaler, unscale=False, inf_at=3, steps=6, init_scale=2.0**14):
    m = P.model()
    opt = SNGM(m.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay, backend=backend)
    sc = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2) if scaler else None
    scales = []
    for t in range(steps):
        opt.zero_grad()
        loss = P.loss(m, t)
        if t == inf_at:
            loss = loss * float("inf")
        if sc is None:
            loss.backward()
            opt.step()
        else:
            sc.scale(loss).backward()
            if unscale:  # the clipping recipe: unscale, clip, then step through the scaler
                sc.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)  # clips nothing
            sc.step(opt)
            sc.update()
            scales.append(sc.get_scale())
    return values(m), opt, scales


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("unscale", [False, True])
def test_grad_scaler_gives_the_unscaled_run(backend, weight_decay, unscale):
    """The real GradScaler, its growth and backoff and an inf step included: the same params as
    training without it (a power-of-two scale divides exactly), the inf step skipped on the
    device, and no unscale pass of SNGM's own (grads stay scaled until the kernels read them)."""
    got, opt, scales = _train(backend, weight_decay, True, unscale)
    ref, ref_opt, _ = _train(backend, weight_decay, False)
    assert opt.skipped_steps.item() == 1 and ref_opt.skipped_steps.item() == 1
    assert scales[3] == scales[2] / 2 and max(scales) > 2.0**14  # backed off once, grew too
    # A power-of-two scale multiplies every value of the scaled backward exactly (no grad here is
    # near fp32's subnormal or overflow range) and the kernels' g * fl32(1 / scale) divides it out
    # exactly: the same bits as the unscaled run, whatever the summation order.
    assert_equal(got + [opt.grad_norm], ref + [ref_opt.grad_norm])


def test_grad_scaler_with_a_scale_that_is_not_a_power_of_two(backend):
    """init_scale=1000: the kernels divide the scaled grads by it on the fly, as the reference
    does, g * fl32(1 / scale) (weight decay makes the scale matter): every step gives the bits of
    the same backend stepping those grads divided by hand, from the same params and momentum (the
    same operations on the same values, summed in the same order). A kernel that ignored the
    scale, or divided in fp64, fails this."""
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, backend=backend)
    m, twin = P.model(), P.model()
    opt, twin_opt = SNGM(m.parameters(), **hyper), SNGM(twin.parameters(), **hyper)
    sc = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=10**6)
    inv_scale = 1.0 / torch.tensor(1000.0)  # fp32, as the kernels and the reference take it
    for t in range(4):
        opt.zero_grad()
        sc.scale(P.loss(m, t)).backward()
        with torch.no_grad():
            for p, q in zip(m.parameters(), twin.parameters()):
                q.copy_(p)
                q.grad = p.grad * inv_scale
                if p in opt.state:
                    twin_opt.state[q]["momentum_buffer"].copy_(opt.state[p]["momentum_buffer"])
        sc.step(opt)
        sc.update()
        twin_opt.step()
        assert opt.skipped_steps.item() == 0 and sc.get_scale() == 1000.0
        bufs = [opt.state[p]["momentum_buffer"] for p in m.parameters()]
        twin_bufs = [twin_opt.state[q]["momentum_buffer"] for q in twin.parameters()]
        assert_equal(values(m) + bufs + [opt.grad_norm],
                     values(twin) + twin_bufs + [twin_opt.grad_norm])


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("norm_in_backward", [False, True])
def test_compiled_step_is_one_graph_and_the_eager_step(backend, norm_in_backward):
    """torch.compile(opt.step, fullgraph=True): no graph break (torch's SGD has one), at most two
    frames in four steps (the first step creates the momentum buffers), and the eager bits."""
    if norm_in_backward and backend == "reference":
        pytest.skip("norm_in_backward needs a fused backend")
    runs = []
    for compiled in (False, True):
        m = P.model()
        opt = SNGM(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend,
                   norm_in_backward=norm_in_backward)
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled \
            else opt.step
        P.train(m, opt, 4, step=step)
        if compiled:
            assert sum(counters["graph_break"].values()) == 0
            assert counters["stats"]["unique_graphs"] <= 2
        runs.append(values(m))
    assert_equal(*runs)


# ---------------------------------------------------------------- capturable, as far as a CPU shows


def test_a_steady_loop_builds_and_uploads_nothing(fused_backend):
    """After the first step, steps with new grad tensors every time (set_to_none=True) find their
    chunk tables cached: nothing built, nothing uploaded (what a captured CUDA graph needs; the
    pointer tables are cached by the exact pointers, which a GPU's caching allocator gives back
    in a steady loop), and a tensor lr changed in place is honoured."""
    from sngm_ext import layout

    m = P.model()
    lr = torch.tensor(0.05)
    opt = SNGM(m.parameters(), lr=lr, momentum=0.9, backend=fused_backend)
    built = []
    real = layout.make_plan
    layout.make_plan = lambda *a, **k: built.append(1) or real(*a, **k)
    try:
        for t in range(5):
            opt.zero_grad()
            P.loss(m, t).backward()
            before = values(m)
            lr.fill_(0.05 * (t + 1))
            opt.step()
            # the step moved the params by at most lr / (1 - momentum), lr as just set, plus what
            # fp32 rounding adds (Lemma 2 in storage: bounds.stored_step_bound)
            after = values(m)
            moved = torch.cat([(a - b).flatten() for a, b in zip(after, before)]).norm()
            flat = [torch.cat([v.flatten() for v in vs]) for vs in (before, after)]
            assert moved <= stored_step_bound(0.05 * (t + 1), 0.9, False, torch.float32,
                                              flat[0].numel(), flat[0].norm(), flat[1].norm())
    finally:
        layout.make_plan = real
    assert len(built) == 1  # the first step's tables; none after
