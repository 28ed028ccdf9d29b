"""The GPU tests would catch a wrong kernel: their checks (gpu_cases.py, scenarios.py), run here on
CPU under Triton's interpreter on small sizes, pass with the real kernels and fail with copies of
the kernels broken in one place each, the way a GPU bug would break them.

Each mutation is applied to a copy of triton_kernels/, loaded in place of sngm_ext.triton_kernels
for one test. What cannot be shown here: a 128-bit access at a misaligned address (the
interpreter has no alignment; on a GPU it is a CUDA error, which fails test_gpu.py's odd-offset
test loudly) and a graph captured without warm-up (test_gpu_extra.py, CUDA only).
"""

import importlib.util
import os
import shutil
import sys

import pytest
import torch

import sngm_ext
from gpu_cases import (
    BIG_BF16,
    Large,
    check_fp64_any_scale,
    check_grad_scaler,
    check_large,
    check_odd_offsets,
    expect_mismatch,
)
from scenarios import assert_runs_match, run
from sngm_ext._triton_kernels_path import NAME, checkout_kernels_dir, load

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 (the kernels run on CPU)")

# Three chunks and a tail in one tensor, a small second one; oracle slices of 5000 elements, so
# the comparison crosses slice and chunk boundaries (the GPU case: 2^31 + 4100 bf16 elements).
SMALL = dict(sizes=(3 * 4096 + 123, 1000), steps=2, slice=5000)

MUTATIONS = {
    # name: (file, original text, broken text)
    "update ignores weight decay": (
        "update.py", "d = direction(load_c(pg + idx, mask, FP64), w, gscale, sign, wd)",
        "d = direction(load_c(pg + idx, mask, FP64), w, gscale, sign, 0.0 * wd)"),
    "chunk starts wrap (as int32 offsets do past 2^31)": (
        "common.py", "start = tl.load(chunks_ptr + n_chunks + pid)",
        "start = tl.load(chunks_ptr + n_chunks + pid) % 8192"),
    "the grad scale's reciprocal in fp64": (
        "common.py", "return to_compute(tl.div_rn(1.0, tl.load(scale_ptr).to(tl.float32)), FP64)",
        "s = tl.load(scale_ptr)\n    if FP64:\n        return 1.0 / s.to(tl.float64)\n"
        "    return tl.div_rn(1.0, s)"),
    "the scalar path drops a chunk's last element": (
        "update.py", "as_pointer(au, DTYPE, False), length, inv,",
        "as_pointer(au, DTYPE, False), length - 1, inv,"),
    "per-tensor norm uses the global one": (
        "update.py", "seg = tl.load(chunks_ptr + 3 * n_chunks + tl.program_id(0).to(tl.int64))",
        "seg = 0 * tl.load(chunks_ptr + 3 * n_chunks + tl.program_id(0).to(tl.int64))"),
    "maximize ignored in the update": (
        "update.py", "            -1.0 if maximize else 1.0,\n            int(nesterov),",
        "            1.0,\n            int(nesterov),"),
    "nesterov ignored": (
        "update.py", "step = tl.where(nesterov != 0, nd + beta * u, u)", "step = u"),
    "the big sums are ignored": ("scaled.py", "use_big = big > 0.0", "use_big = big < 0.0"),
    "small elements summed unscaled": (
        "scaled.py", "small = x < _f64(_SMALL)", "small = x < _f64(0.0)"),
}


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """kernels(mutation or None): load a (broken) copy of triton_kernels/ as
    sngm_ext.triton_kernels for this test."""
    src = checkout_kernels_dir()
    if src is None:
        pytest.skip("needs the source checkout's triton_kernels/")

    def use(mutation=None):
        dst = tmp_path / "triton_kernels"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        if mutation is not None:
            file, old, new = MUTATIONS[mutation]
            text = (dst / file).read_text()
            assert text.count(old) == 1, f"{mutation}: the text to break is not in {file} once"
            (dst / file).write_text(text.replace(old, new))
        for key in [k for k in sys.modules if k == NAME or k.startswith(NAME + ".")]:
            monkeypatch.delitem(sys.modules, key)
        spec = importlib.util.spec_from_file_location(NAME, dst / "__init__.py",
                                                      submodule_search_locations=[str(dst)])
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, NAME, mod)
        spec.loader.exec_module(mod)
        monkeypatch.setattr(sngm_ext, "triton_kernels", mod, raising=False)
        assert load() is mod  # what the sngm_triton ops will call
        return mod

    return use


def _scenario(config, dtype=torch.float32):
    ref = run("reference", dtype, config)
    got = run("triton", dtype, config)
    assert_runs_match(got, ref, dtype, "triton")


CHECKS = {  # each GPU test's check, on CPU sizes
    "large": lambda: check_large("triton", Large(dtype=torch.float32, **SMALL), "cpu"),
    "large bf16": lambda: check_large("triton", Large(dtype=torch.bfloat16, lr=1e3, **SMALL),
                                      "cpu"),
    "odd offsets": lambda: check_odd_offsets("triton", torch.float32, "cpu", steps=2),
    "GradScaler": lambda: check_grad_scaler("triton", torch.float64, "cpu"),
    "tensor norm": lambda: _scenario("tensor_norm"),
    "three groups": lambda: _scenario("three_groups"),
    "fp64 x 2^1000": lambda: check_fp64_any_scale("triton", "cpu", 1000),
    "fp64 x 2^-1000": lambda: check_fp64_any_scale("triton", "cpu", -1000),
}

CAUGHT_BY = [
    ("update ignores weight decay", "large"),
    ("update ignores weight decay", "large bf16"),
    ("chunk starts wrap (as int32 offsets do past 2^31)", "large bf16"),
    ("the grad scale's reciprocal in fp64", "GradScaler"),
    ("the scalar path drops a chunk's last element", "odd offsets"),
    ("per-tensor norm uses the global one", "tensor norm"),
    ("maximize ignored in the update", "three groups"),
    ("nesterov ignored", "three groups"),
    ("the big sums are ignored", "fp64 x 2^1000"),
    ("small elements summed unscaled", "fp64 x 2^-1000"),
]


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_the_checks_pass_the_real_kernels(kernels, check):
    kernels(None)  # a verbatim copy: what the mutations are applied to
    CHECKS[check]()


def test_the_large_oracle_is_the_reference():
    """The slice-by-slice oracle of the large cases agrees with the reference backend itself."""
    check_large("reference", Large(dtype=torch.bfloat16, lr=1e3, **SMALL), "cpu")


@pytest.mark.parametrize("mutation, check", CAUGHT_BY)
def test_a_broken_kernel_fails_the_check(kernels, mutation, check):
    kernels(mutation)
    print(f"{mutation} -> {check}: {expect_mismatch(CHECKS[check])[:300]}")


def test_gpu_sizes_are_what_they_claim():
    """The GPU's large case crosses 2^31 elements in one bf16 tensor."""
    assert BIG_BF16.dtype == torch.bfloat16 and max(BIG_BF16.sizes) > 2**31
    assert BIG_BF16.weight_decay > 0 and BIG_BF16.sizes[0] % 4096 != 0
