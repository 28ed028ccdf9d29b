"""The Triton ops under the interpreter: they refuse bad arguments on the host, as the native ops
do, before anything is written; and GradScaler's 1 / scale rounds as the reference's and the CUDA
kernel's (the fp32 reciprocal of the fp32 scale), seen with fp64 params, weight decay and a scale
that is not a power of two."""

import math

import pytest
import torch

from sngm_ext import _selfcheck, resolve_backend
from sngm_ext._triton_kernels_path import load
from sngm_ext.layout import CHUNK, make_plan


@pytest.fixture
def ops():
    try:
        return resolve_backend("triton", torch.device("cpu"))[1]
    except Exception as e:  # noqa: BLE001  BackendUnavailable: no interpreter or no triton
        pytest.skip(f"triton does not run on CPU tensors here: {e}")


def _lists(sizes=(100, 5000), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(n, generator=g).to(dtype) for n in sizes],
            [torch.randn(n, generator=g).to(dtype) for n in sizes],
            [torch.randn(n, generator=g).to(dtype) for n in sizes])


def test_ops_refuse_bad_arguments_before_writing(ops):
    """Each refusal is a RuntimeError (as TORCH_CHECK's) naming the op and the problem, and the
    tensors are as they were."""
    ws, gs, us = _lists()
    plan = make_plan([[100, 5000]], False, torch.device("cpu"))
    ch, parts = plan.chunks[0], plan.partials
    sumsq = torch.ones(3, 1, dtype=torch.float64)
    one = ch[:, :1].contiguous()
    ints = [torch.zeros(100, dtype=torch.int32)]
    before = [x.clone() for x in ws + us + [parts]]

    def upd(w=ws, g=gs, u=us, c=ch, s=sumsq, scale=None, lr_t=None):
        return lambda: ops.update(w, g, u, c, s, scale, lr_t, 0.1, 0.9, 0.0, False, False)

    def sq(w=ws, g=gs, c=ch, scale=None, p=parts, off=0):
        return lambda: ops.sumsq(w, g, c, scale, 0.0, False, p, off)

    meta = torch.empty(100, device="meta")

    def direct(w, g, c):
        return lambda: load().update(w, g, [], c, sumsq, None, None, 0.1, 0.0, 0.0, False, False,
                                     block=CHUNK)

    cases = [
        ("sumsq: unsupported dtype torch.int32", sq(ints, ints, one)),
        ("params\\[1\\] has dtype torch.float64 but params\\[0\\] has torch.float32",
         sq([ws[0], ws[1].double()], [gs[0], gs[1].double()])),
        ("sumsq: 2 params but 1 grads", sq(g=gs[:1])),
        ("2 params but 1 momentum_buffers", upd(u=us[:1])),
        ("grads\\[1\\] has 4999 elements but params\\[1\\] has 5000", upd(g=[gs[0], gs[1][1:]])),
        ("grads\\[0\\] has dtype torch.float64", upd(g=[gs[0].double(), gs[1]])),
        ("momentum_buffers\\[0\\] .* must be contiguous like params\\[0\\]",
         upd([ws[0].view(10, 10)], [gs[0].view(10, 10)], [us[0].view(10, 10).t()], one)),
        ("params\\[0\\] .* must be non-overlapping and dense",
         upd([ws[1][::2]], [gs[1][::2]], [us[1][::2]], one)),
        ("chunks has dtype torch.int32", upd(c=ch.int())),
        ("chunks must have shape \\[4, n_chunks\\]", upd(c=ch[:3].contiguous())),
        ("chunks must be contiguous", upd(c=ch.t().contiguous().t())),
        ("partials has dtype torch.float32, expected torch.float64", sq(p=parts.float())),
        ("partials\\[:, 1:4\\] is out of range for 3 partials", sq(off=1)),
        ("partials\\[:, -1:2\\] is out of range", sq(off=-1)),
        ("grad_scale must be a one-element float32 tensor", sq(scale=torch.tensor(2.0).double())),
        ("grad_scale must be a one-element float32 tensor", upd(scale=torch.ones(2))),
        ("sumsq has dtype torch.float32", upd(s=sumsq.float())),
        ("update: sumsq must have shape \\[3, n >= 1\\]", upd(s=sumsq[:, :0])),
        ("lr_tensor must be a one-element float32 or float64 tensor", upd(lr_t=torch.ones(2))),
        ("lr_tensor must be a one-element float32 or float64 tensor",
         upd(lr_t=torch.tensor(1, dtype=torch.int64))),
        # other devices' tensors reach the launcher itself (the dispatcher sends meta to the
        # fake kernel)
        ("this kernel runs on CPU tensors, got meta", direct([meta], [meta], one.to("meta"))),
        ("params\\[0\\] is on meta, expected cpu", direct([meta], [meta], one)),
        ("finalize: seg_ptr must have shape", lambda: ops.finalize(parts, plan.seg_ptr[:0], None,
                                                                   sumsq)),
        ("finalize: sumsq has 2 columns: 1 \\(the total\\) or at least 1 \\+ 3",
         lambda: ops.finalize(parts, torch.tensor([0, 1, 2, 2]), None, torch.ones(3, 2).double())),
        ("finalize: found_inf must be a one-element float32", lambda: ops.finalize(
            parts, plan.seg_ptr, torch.tensor(0.0).double(), sumsq)),
        ("finalize: seg_ptr has dtype torch.int32", lambda: ops.finalize(
            parts, plan.seg_ptr.int(), None, sumsq)),
    ]
    for match, call in cases:
        with pytest.raises(RuntimeError, match="^sngm_triton::.*" + match):
            call()
        assert all(torch.equal(a, b) for a, b in zip(ws + us + [parts], before)), match


def test_an_empty_list_writes_zero_partials(ops):
    """No tensor named: every chunk's partial is 0, as the CUDA kernel writes it."""
    plan = make_plan([[100, 5000]], False, torch.device("cpu"))
    parts = torch.full((3, 5), math.nan, dtype=torch.float64)
    ops.sumsq([], [], plan.chunks[0], None, 0.0, False, parts, 1)
    assert parts[:, 0].isnan().all() and parts[:, 4].isnan().all() and (parts[:, 1:4] == 0).all()  # 3 chunks


def test_grad_scale_reciprocal_is_the_fp32_one(ops):
    """fp64 params, weight decay, grad_scale 1000.7: d = g * double(1 / float(scale)) + wd * w,
    bit for bit (an fp64 reciprocal is up to 2^-24 off: ~1e-8 relative in d)."""
    ws, gs, us = _lists((300, 5000), torch.float64)
    scale = torch.tensor(1000.7)
    plan = make_plan([[300, 5000]], False, torch.device("cpu"))
    ops.sumsq(ws, gs, plan.chunks[0], scale, 0.5, False, plan.partials, 0)
    inv = (1.0 / scale.float()).double()
    d = [g * inv + 0.5 * w for w, g in zip(ws, gs)]
    expect = torch.stack([x[s:s + n].square().sum()
                          for x, (s, n) in zip([d[0], d[1], d[1]], [(0, 300), (0, 4096),
                                                                    (4096, 904)])])
    # Two fp64 sums of the same n <= 4096 nonnegative terms in different orders (the kernel's
    # tree, torch's vectorized reduction): within 2 gamma_n of each other (Higham, Accuracy and
    # Stability of Numerical Algorithms, 2002, eq. 3.4), gamma_n = n u / (1 - n u), u = 2^-53. The
    # fp64 reciprocal's d is ~1e-8 off: far outside.
    n, u = torch.tensor([300.0, 4096, 904], dtype=torch.float64), 2.0**-53
    assert ((plan.partials[0] - expect).abs() <= 2 * n * u / (1 - n * u) * expect).all()
    assert (plan.partials[1:] == 0).all()
    sumsq = torch.tensor([[expect.sum().item()], [0.0], [0.0]], dtype=torch.float64)
    w0, u0 = [w.clone() for w in ws], [u.clone() for u in us]
    ops.update(ws, gs, us, plan.chunks[0], sumsq, scale, None, 0.1, 0.9, 0.5, False, False)
    inv_n = 1.0 / math.sqrt(sumsq[0, 0].item())
    for w, u, w_0, u_0, x in zip(ws, us, w0, u0, d):
        eu = 0.9 * u_0 + x * inv_n
        assert torch.equal(u, eu) and torch.equal(w, w_0 - 0.1 * eu)


def test_grad_scaler_with_fp64_params_matches_the_reference(ops):
    """A real GradScaler (scale 1000.7), fp64 params, weight decay 0.5: the reference's bounds
    (a few fp64 ulps; the fp64 reciprocal misses them by ~1e7)."""
    ref = _selfcheck.scaler_run("reference", torch.device("cpu"))
    got = _selfcheck.scaler_run("triton", torch.device("cpu"))
    _selfcheck.assert_runs_match(got, ref, torch.float64, "triton, GradScaler, fp64")
