"""Finding, building and falling back: the native extension's loader (sngm_ext/native.py).

Each scenario runs in a subprocess with its own PATH and a fresh, empty extension cache
(SNGM_EXTENSIONS_DIR) and SNGM_PREBUILT=0, so it neither sees nor disturbs the extension this
process has loaded.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(code, tmp_path, path=None, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("CXX", "SNGM_CPU_CAPABILITY")}
    e.update(SNGM_PREBUILT="0", SNGM_EXTENSIONS_DIR=str(tmp_path / "cache"),
             PYTHONPATH=os.pathsep.join([ROOT, TESTS]), MAX_JOBS=e.get("MAX_JOBS", "2"))
    if path is not None:
        e["PATH"] = path
    e.update(env)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e, cwd=str(tmp_path),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


FALLBACK = """
    import json, math, warnings
    import torch
    from bounds import FIRST_STEP_RTOL
    from sngm_ext import SNGM, BackendUnavailable

    def one_step(backend):
        p = torch.nn.Parameter(torch.ones(10))
        p.grad = torch.full((10,), 2.0)
        opt = SNGM([p], lr=0.1, momentum=0.9, backend=backend)
        opt.step()
        return p.detach()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = one_step("auto")
    # one step from w = 1 on equal grads (bounds.FIRST_STEP_RTOL; the fp32 expectation's own
    # rounding is within it too)
    out = {"auto_ok": torch.allclose(w, torch.full((10,), 1 - 0.1 / math.sqrt(10)),
                                     rtol=FIRST_STEP_RTOL[torch.float32], atol=0),
           "warnings": [str(x.message) for x in caught]}
    try:
        one_step("cpu")
        out["cpu"] = "ran"
    except BackendUnavailable as e:
        out["cpu"] = str(e)
    print(json.dumps(out))
"""


def test_no_compiler_auto_falls_back_with_a_warning_and_cpu_says_why(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out, _ = _run(FALLBACK, tmp_path, path=str(empty))
    assert out["auto_ok"]
    [warning] = [w for w in out["warnings"] if "sngm_ext" in w]
    assert "reference" in warning and "C++ compiler" in warning, warning
    assert "not on PATH" in out["cpu"] and "'c++'" in out["cpu"], out["cpu"]
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing was built


def test_jit_switched_off_says_so(tmp_path):
    out, _ = _run(FALLBACK, tmp_path, SNGM_NO_JIT="1")
    assert out["auto_ok"]
    assert "SNGM_NO_JIT" in out["cpu"]
    assert any("SNGM_NO_JIT" in w for w in out["warnings"])


def test_a_failing_build_falls_back_naming_the_compiler_error(tmp_path):
    """A compiler that runs but fails (here: a script that exits 1) is a build failure."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: sngm test compiler refuses' >&2\nexit 1\n")
    fake.chmod(0o755)
    path = os.pathsep.join([str(bin_), os.environ.get("PATH", "")])
    if shutil.which("ninja", path=path) is None:
        pytest.skip("ninja is not installed")
    out, _ = _run(FALLBACK, tmp_path, path=path, CXX=str(fake))
    assert out["auto_ok"]
    assert "building the native cpu extension failed" in out["cpu"], out["cpu"]
    assert any("failed" in w for w in out["warnings"])


def test_stale_prebuilt_modules_are_recognized(tmp_path):
    from sngm_ext import native

    so = tmp_path / "m.so"
    so.write_bytes(b"\x7fELF...sngm-source-hash:h0123456789abcdef\x00...")
    assert native._stale(str(so), "0123456789abcdef") is None
    assert "0123456789abcdef" in native._stale(str(so), "fedcba9876543210")
    assert native._stale(str(so), None) is None  # an installed package: no sources to compare
    so.write_bytes(b"no marker")
    assert native._stale(str(so), "fedcba9876543210") is None


BUILD = """
    import json, time
    import torch
    from sngm_ext import native
    from scenarios import assert_runs_match, run

    t = time.time()
    native.load_ops("cpu")
    secs = time.time() - t
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert_runs_match(run("cpu", dtype, "three_groups"), run("reference", dtype, "three_groups"),
                          dtype)
    info = native.info()["cpu"]
    print(json.dumps({"how": info["how"], "capability": info["capability"], "seconds": secs,
                      "reused": info.get("reused")}))
"""


def test_first_use_builds_into_the_cache_and_reuses_it(tmp_path):
    """No prebuilt module: the first use builds the portable ("default") kernels with ninja into
    the cache, says when it starts and when it is done (time, where), and they match the
    reference; later processes load that build silently, even with no compiler or ninja on PATH,
    and a changed build description (the stamp) builds again."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        if os.environ.get("CI"):
            pytest.fail("CI needs a C++ compiler and ninja")
        pytest.skip("no C++ compiler or no ninja")
    out, err = _run(BUILD, tmp_path, SNGM_CPU_CAPABILITY="default")
    assert out == {**out, "how": "built on first use", "capability": "default", "reused": False}
    assert "building the CPU kernels (default)" in err, err
    [so] = (tmp_path / "cache").rglob("sngm_native_cpu_default*.so")
    assert "built the CPU kernels (default) in " in err and f" s: {so}" in err, err
    again, err2 = _run(BUILD, tmp_path, SNGM_CPU_CAPABILITY="default")
    assert again == {**again, "how": "built on first use", "reused": True}
    assert "built" not in err2, err2
    empty = tmp_path / "bin"  # no compiler, no ninja: the cached build still loads (and matches)
    empty.mkdir()
    offline, err3 = _run(BUILD, tmp_path, path=str(empty), SNGM_CPU_CAPABILITY="default")
    assert offline == {**offline, "how": "built on first use", "reused": True}, err3
    stamp = so.parent / "sngm_source_hash"
    stamp.write_text(stamp.read_text() + "0")  # other sources or flags than the cached build's
    # not loaded: it would be rebuilt, and there is no compiler to do it
    stale, _ = _run(FALLBACK, tmp_path, path=str(empty), SNGM_CPU_CAPABILITY="default")
    assert "not on PATH" in stale["cpu"], stale


def test_the_wheel_ships_sources_types_and_licence(tmp_path):
    """A wheel built from a copy of the checkout (nothing compiled) holds what a first-use build
    needs (csrc/ as sngm_ext/csrc), the Triton kernels, the PEP 561 marker and the licence."""
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for folder in ("sngm_ext", "triton_kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder,
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "build"))
    env = {**os.environ, "SNGM_SKIP_NATIVE_BUILD": "1"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout
    [wheel] = (tmp_path / "dist").glob("sngm_ext-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in ("sngm_ext/py.typed", "sngm_ext/csrc/sngm_math.h",
                 "sngm_ext/triton_kernels/tables.py", "sngm_ext/device_cache.py"):
        assert want in names, want
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
