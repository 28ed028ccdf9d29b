"""``python -m sngm_ext``: the bug-report summary runs, in JSON and plain, and says which backends
run on this machine and why the others do not."""

import json
import os
import subprocess
import sys

import pytest
import torch

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
