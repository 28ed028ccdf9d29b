"""Every backend against the reference, per dtype, over odd shapes, groups, None grads and steps
(bounds: scenarios.py), and the reference against an independent float64 Algorithm 1."""

import pytest
import torch

from bounds import norm_rtol_of_order
from scenarios import CONFIGS, DTYPES, assert_runs_match, run


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_matches_reference(backend, dtype, config):
    if backend == "reference":
        pytest.skip("the reference is the oracle here (test_reference.py checks it)")
    ref = run("reference", dtype, config)
    got = run(backend, dtype, config)
    assert_runs_match(got, ref, dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bounds_reject_a_per_tensor_norm(dtype):
    """The bounds must fail a backend that used per-tensor norms in global mode."""
    ref = run("reference", dtype, "three_groups")
    wrong = run("reference", dtype, "three_groups", norm="tensor")
    with pytest.raises(AssertionError):
        assert_runs_match(wrong, ref, dtype)


def test_fused_is_bitwise_deterministic(fused_backend):
    a = run(fused_backend, torch.float32, "three_groups")
    b = run(fused_backend, torch.float32, "three_groups")
    for x, y in zip(a.params + a.bufs + a.norms, b.params + b.bufs + b.norms):
        if x is not None:
            assert torch.equal(x, y)


def test_mixed_dtypes_share_one_norm(backend):
    """fp32 and bf16 params in one group: one norm over both (fp64 sums), two kernel lists."""
    outs = []
    for be in ("reference", backend):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(300))
        b = torch.nn.Parameter(torch.randn(5000).bfloat16())
        from sngm_ext import SNGM

        opt = SNGM([a, b], lr=0.1, momentum=0.9, backend=be)
        for s in range(2):
            torch.manual_seed(10 + s)
            a.grad = torch.randn(300)
            b.grad = torch.randn(5000).bfloat16()
            opt.step()
        outs.append((a.detach().clone(), b.detach().clone(), opt.grad_norm))
    # scenarios.py's bounds after s = 2 steps, per element (a flipped rounding is one unit at the
    # element's own scale): rtol 2 s eps, atol 2 s eps (lr s^2 + lr (1 + beta) s^2) = 4 eps 1.16,
    # as |u_i| <= s max|d_i / n| <= s and w_i moves at most lr s^2 (||d / n|| = 1); lr .1, beta .9
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=4 * 2**-23, atol=4 * 2**-23 * 1.16)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=4 * 2**-7, atol=4 * 2**-7 * 1.16)
    # no weight decay: the norm is the grads' alone, two fp64 sums of the same 5300 exact squares
    # in two orders (2 gamma_5300 apart at most), their square roots: bounds.norm_rtol_of_order
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=norm_rtol_of_order(5300), atol=0.0)
