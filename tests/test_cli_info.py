"""``python -m sngm_ext``: the bug-report summary runs, in JSON and plain, and says which backends
run on this machine and why the others do not; ``--check`` passes the backends here and fails a
wrong one."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sngm_ext._selfcheck import cases

BACKENDS = ("reference", "triton", "cpu", "cuda")


def _run(*args):
    p = subprocess.run([sys.executable, "-m", "sngm_ext", *args], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def report():
    return json.loads(_run("--json"))


def test_json_versions(report):
    assert report["sngm_ext"]["version"]
    assert report["torch"]["version"] == torch.__version__
    assert report["python"].startswith(".".join(map(str, sys.version_info[:3])))
    for key in ("triton", "numpy", "platform", "cpu", "cpu_capability", "cuda_devices"):
        assert report[key], key
    assert "error" not in json.dumps(report["native"])


def test_json_one_entry_per_backend(report):
    b = report["backends"]
    assert set(b) == set(BACKENDS)
    for name, entry in b.items():
        assert isinstance(entry["runs"], bool), name
        assert entry["runs"] or entry["why"], name
    assert b["reference"]["runs"]
    if not b["cpu"]["runs"] and not os.environ.get("CI"):  # as conftest: required in CI only
        pytest.skip(f"the native cpu backend does not run here: {b['cpu']['why']}")
    assert b["cpu"]["runs"], b["cpu"].get("why")
    assert "TRITON_INTERPRET" in b["triton"]["note"]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available():
        assert not b["cuda"]["runs"] and "CUDA" in b["cuda"]["why"]
        assert b["triton"]["runs"] == interpreted, b["triton"].get("why")
        if not interpreted:
            assert "TRITON_INTERPRET=1" in b["triton"]["why"]
    assert report["auto"]["cpu"] == "cpu"
    assert report["native"]["loaded"]["cpu"]["how"] in ("prebuilt", "built on first use")


def test_plain_mentions_each_backend():
    out = _run()
    for name in BACKENDS + ("auto",):
        assert f"\n  {name} " in out, name
    assert "sngm_ext:" in out and "torch:" in out and "native:" in out


# ---------------------------------------------------------------- --check

# A backend broken in a subprocess: its update op scales the learning rate by 1.01 (a bug a
# kernel could have), through the FusedOps every step resolves.
_BREAK = """
import sys
from sngm_ext import _ops
real = _ops.FusedOps.__init__
def broken(self, namespace):
    real(self, namespace)
    if namespace == {namespace!r}:
        update = self.update
        self.update = lambda *a: update(*a[:7], a[7] * 1.01, *a[8:])
_ops.FusedOps.__init__ = broken
from sngm_ext.__main__ import main
sys.exit(main(["--check"]))
"""


def _check(code=None, interpret=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "sngm_ext", "--check"] if code is None else [sys.executable,
                                                                             "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _lines(out):
    return {ln.split(":")[0]: ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL",
                                                                              "SKIP"))}


def test_check_passes_every_backend_here():
    """Every fused backend that runs here PASSes (triton under the interpreter, cpu where
    built), cuda is SKIPped with its reason without a GPU; exit status 0."""
    p = _check()
    assert p.returncode == 0, p.stdout + p.stderr
    lines = _lines(p.stdout)
    if not torch.cuda.is_available():
        assert "no CUDA device" in p.stdout.splitlines()[0]
        assert "no CUDA device" in lines["SKIP cuda on cuda"], p.stdout
    assert "PASS triton on cpu" in lines, p.stdout
    n = len(cases(torch.device("cpu")))
    assert re.search(rf"PASS triton on cpu: {n} cases, worst error 0\.\d\d of its bound", p.stdout)
    assert p.stdout.rstrip().endswith("check: all backends match the reference")


@pytest.mark.parametrize("namespace, backend", [("sngm_triton", "triton"),
                                                ("sngm_native", "cpu")])
def test_check_fails_a_wrong_backend(namespace, backend):
    """A backend whose update is 1% off fails its line, naming the case and the element;
    the other backends still PASS; exit status 1."""
    p = _check(_BREAK.format(namespace=namespace))
    lines = _lines(p.stdout)
    if f"SKIP {backend} on cpu" in lines:
        pytest.skip(lines[f"SKIP {backend} on cpu"])
    assert p.returncode == 1, p.stdout + p.stderr
    fail = lines[f"FAIL {backend} on cpu after 0 passing cases"]
    assert "float32 three groups: param" in fail and "elements off the bound" in fail, fail
    other = {"triton": "cpu", "cpu": "triton"}[backend]
    assert f"PASS {other} on cpu" in lines or f"SKIP {other} on cpu" in lines, p.stdout
    assert "check: MISMATCH" in p.stdout


def test_check_has_no_json_form():
    p = subprocess.run([sys.executable, "-m", "sngm_ext", "--check", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--json" in p.stderr
