"""Every backend against the reference, per dtype, over odd shapes, groups, None grads and steps."""

import pytest
import torch

from scenarios import CONFIGS, DTYPES, assert_close, run


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_matches_reference(backend, dtype, config):
    ref_p, ref_b, ref_n, _ = run("reference", dtype, config)
    p, b, n, _ = run(backend, dtype, config)
    for i, (x, y) in enumerate(zip(p, ref_p)):
        assert x.shape == y.shape
        assert_close(x.detach(), y.detach(), dtype, f"param {i}")
    for i, (x, y) in enumerate(zip(b, ref_b)):
        assert (x is None) == (y is None), f"momentum buffer {i} presence"
        if x is not None:
            assert_close(x, y, dtype, f"momentum {i}")
    for x, y in zip(n, ref_n):
        assert x.dtype == y.dtype == torch.float64
        assert_close(x, y, torch.float32, "grad norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tolerances_reject_a_per_tensor_norm(dtype):
    """The tolerances above must fail a backend that used per-tensor norms in global mode."""
    glob, _, _, _ = run("reference", dtype, "global")
    per_tensor, _, _, _ = run("reference", dtype, "global", norm="tensor")
    with pytest.raises(AssertionError):
        for x, y in zip(per_tensor, glob):
            assert_close(x, y, dtype)


def test_fused_is_bitwise_deterministic(fused_backend):
    a, ab, an, _ = run(fused_backend, torch.float32, "global")
    b, bb, bn, _ = run(fused_backend, torch.float32, "global")
    for x, y in zip(a + ab + an, b + bb + bn):
        if x is not None:
            assert torch.equal(x, y)


def test_mixed_dtypes_share_one_norm(backend):
    """fp32 and bf16 params in one model: one norm over both (accumulated in fp32)."""
    torch.manual_seed(0)
    outs = []
    for be in ("reference", backend):
        torch.manual_seed(0)
        a = torch.nn.Parameter(0.003 * torch.randn(300))
        b = torch.nn.Parameter((0.003 * torch.randn(200)).bfloat16())
        from sngm_ext import SNGM

        opt = SNGM([a, b], lr=0.1, momentum=0.9, backend=be)
        for s in range(2):
            torch.manual_seed(10 + s)
            a.grad = torch.randn(300)
            b.grad = torch.randn(200).bfloat16()
            opt.step()
        outs.append((a.detach().clone(), b.detach().clone(), opt.grad_norm))
    assert_close(outs[1][0], outs[0][0], torch.float32)
    assert_close(outs[1][1], outs[0][1], torch.bfloat16)
    assert_close(outs[1][2], outs[0][2], torch.float32)
