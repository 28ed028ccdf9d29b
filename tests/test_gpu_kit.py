"""The GPU verification kit without a GPU: scripts/gpu_check.sh --dry-run (its stages, plan, budget,
timeouts, failures, status file and summary, with each stage's command replaced by a stand-in),
--rehearse (real stages on CPU, Triton in its interpreter), the kit's bare checkout (both GPU
backends importable with nothing installed) and benchmarks/bench_step.py --budget-s on CPU
(results written per set, sets past the budget skipped, a killed run keeps what it measured).
A few seconds each; no GPU, no network.
"""

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "scripts", "gpu_check.sh")
BENCH = os.path.join(ROOT, "benchmarks", "bench_step.py")
STAGES = ["env", "build", "check", "gpu_tests", "extra", "bench"]
CORRECTNESS = STAGES[:-1]
PLAN = {"env": 15, "build": 100, "check": 45, "gpu_tests": 90, "extra": 75}  # the defaults
LOGS = {s: "env.txt" if s == "env" else f"{s}.log" for s in STAGES}
COLUMNS = ["stage", "status", "seconds", "planned", "limit", "log", "note"]

needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")


def _kit(out, *args, timeout=120, **env_over):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env["GPU_CHECK_PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in env_over.items()})
    t0 = time.perf_counter()
    p = subprocess.run(["bash", KIT, str(out), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    return p, time.perf_counter() - t0


def _status(out):
    with open(os.path.join(out, "status.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0].split("\t") == COLUMNS
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == STAGES, lines  # one line per stage, in order
    return {r[0]: {"status": r[1], "seconds": float(r[2]), "planned": float(r[3]),
                   "limit": float(r[4]), "log": r[5], "note": r[6]} for r in rows}


def _check_logs_and_summary(out, p, st, mode="dry"):
    for stage, row in st.items():
        assert row["log"] == LOGS[stage]
        path = os.path.join(out, row["log"])
        assert os.path.isfile(path) and os.path.getsize(path) > 0, stage
    assert f"== gpu_check summary ({mode})" in p.stdout
    assert "== key lines" in p.stdout
    for stage, row in st.items():
        assert f"-- {stage}: {row['status']}" in p.stdout
    with open(os.path.join(out, "summary.txt")) as f:
        assert f.read().strip() == p.stdout[p.stdout.index("== gpu_check summary"):].strip()


# A budget of seconds for the timed dry runs: plans that add up to it, and stand-ins that take
# (4/5 of) their plan.
SMALL_PLAN = dict(GPU_CHECK_BUDGET_S=12, GPU_CHECK_RESERVE_S=0.5, GPU_CHECK_PLAN_ENV=1,
                  GPU_CHECK_PLAN_BUILD=2, GPU_CHECK_PLAN_CHECK=1, GPU_CHECK_PLAN_GPU_TESTS=2,
                  GPU_CHECK_PLAN_EXTRA=1, GPU_CHECK_MIN_STAGE_S=0.5, GPU_CHECK_BENCH_MIN_S=1,
                  GPU_CHECK_KILL_AFTER_S=0.5, GPU_CHECK_DRY_SLEEP_S="plan")


@needs_shell
def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "kit out"  # a space in the path, and the folder exists with old results
    out.mkdir()
    (out / "status.tsv").write_text("stage\tstatus\nold\tline\nold\tline\n")
    (out / "bench").mkdir()
    (out / "bench" / "latest_gpu.json").write_text("{not json")
    p, wall = _kit(out, "--dry-run")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert {s: r["status"] for s, r in st.items()} == {s: "ok" for s in STAGES}
    _check_logs_and_summary(out, p, st)
    # the plan: the correctness stages' plans, the benchmark what is left, adding up to the budget
    assert ("plan (s): env 15.0 + build 100.0 + check 45.0 + gpu_tests 90.0 + extra 75.0 + "
            "kill grace 5 x 5.0 + bench 95.0 (what is left) + reserve 5.0 = budget 450.0"
            ) in p.stdout
    assert {s: st[s]["planned"] for s in CORRECTNESS} == PLAN
    assert all(st[s]["limit"] >= PLAN[s] for s in CORRECTNESS)
    assert json.loads((out / "env.json").read_text())["dry_run"] is True
    # the check stage needs triton and cuda to PASS on cuda, and reports every line
    assert "PASS cuda on cuda" in p.stdout and "SKIP cpu on cpu" in p.stdout
    # the benchmark's targets reach the summary, met or not
    assert "target resnet20 sngm-cuda: step / fused SGD 1.40x (target <= 1.15x): MISSED" in p.stdout
    for name in ("gpu_tests.junit.xml", "extra.junit.xml"):
        assert (out / name).is_file()
    rep = json.loads((out / "bench" / "latest_gpu.json").read_text())
    assert rep["sets"][0]["name"] == "resnet20"
    # bench_step.py gets what is left less the 15 s margin: ~450 - 5 - 5 (its SIGKILL grace) - 15
    bench_log = (out / "bench.log").read_text().replace("\\", "")  # the log quotes with \\
    m = re.search(r"benchmarks/bench_step\.py --device cuda --phases --sets "
                  r"resnet20,resnet50,gpt2,decoder1b,counts --budget-s ([0-9.]+) --out", bench_log)
    assert m and 415 < float(m.group(1)) <= 425, bench_log
    assert "TRITON_INTERPRET" in (out / "gpu_tests.log").read_text()
    assert "tests/test_gpu_extra.py -m gpu_extra" in (out / "extra.log").read_text()
    # every stage runs from the checkout, builds into one folder and compiles into one cache
    for stage in STAGES:
        assert f"planned {st[stage]['planned']:.1f} s" in (out / LOGS[stage]).read_text()
    assert f"SNGM_EXTENSIONS_DIR={ROOT}/build/gpu_check/extensions" in (out / "build.log").read_text()
    assert st["bench"]["note"].startswith("2 of 3 sets measured (finished)")
    assert wall < 30


@needs_shell
def test_dry_run_keeps_to_the_plan(tmp_path):
    """Stand-ins that take their plans: every stage runs, the benchmark gets what is left."""
    out = tmp_path / "out"
    p, wall = _kit(out, "--dry-run", **SMALL_PLAN)
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert {s: r["status"] for s, r in st.items()} == {s: "ok" for s in STAGES}
    for s in CORRECTNESS:
        assert st[s]["limit"] >= st[s]["planned"] and st[s]["seconds"] <= st[s]["planned"] + 1
    assert st["bench"]["limit"] >= 1
    assert sum(r["seconds"] for r in st.values()) <= 12 and wall < 20


@needs_shell
def test_an_overrunning_stage_takes_the_benchmarks_time_not_the_checks(tmp_path):
    """The build never ends: it is stopped where the later correctness stages' plans begin, each
    of them still gets its whole plan, and only the benchmark loses its time."""
    out = tmp_path / "hung"
    p, wall = _kit(out, "--dry-run", **SMALL_PLAN, GPU_CHECK_DRY_SLEEP_BUILD=100)
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert st["build"]["status"] == "timeout" and st["bench"]["limit"] < 2
    assert all(st[s]["status"] == "ok" and st[s]["limit"] >= st[s]["planned"]
               for s in ("env", "check", "gpu_tests", "extra"))
    assert wall < 20
    _check_logs_and_summary(out, p, st)


@needs_shell
def test_dry_run_timeout_and_failure_are_recorded_and_later_stages_run(tmp_path):
    out = tmp_path / "out"
    p, wall = _kit(out, "--dry-run", GPU_CHECK_CAP_BENCH=1, GPU_CHECK_BENCH_MIN_S=1,
                   GPU_CHECK_DRY_TIMEOUT="bench,gpu_tests", GPU_CHECK_CAP_GPU_TESTS=1,
                   GPU_CHECK_PLAN_GPU_TESTS=1, GPU_CHECK_DRY_FAIL="extra")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert {s: r["status"] for s, r in st.items()} == {
        "env": "ok", "build": "ok", "check": "ok", "gpu_tests": "timeout", "extra": "failed",
        "bench": "timeout"}
    assert 0.9 <= st["bench"]["seconds"] < 5
    # killed after writing one set: the partial results are kept and reported
    assert st["bench"]["note"].startswith("timed out after 1.0 s; 1 of 3 sets measured (partial")
    assert json.loads((out / "bench" / "latest_gpu.json").read_text())["budget"]["finished"] is False
    assert "exit status 3" in st["extra"]["note"]  # why it failed, in the status file
    _check_logs_and_summary(out, p, st)
    assert "sleeping past the limit" in (out / "bench.log").read_text()
    assert "last lines of bench.log" in p.stdout and "last lines of extra.log" in p.stdout
    assert wall < 30


@needs_shell
def test_a_failing_check_says_why(tmp_path):
    out = tmp_path / "out"
    p, _ = _kit(out, "--dry-run", GPU_CHECK_STAGES="check", GPU_CHECK_DRY_FAIL="check")
    st = _status(out)
    assert st["check"]["status"] == "failed"
    assert st["check"]["note"] == "[dry-run] triton did not PASS on cuda", st["check"]
    assert "cuda did not PASS on cuda" in p.stdout


@needs_shell
def test_stage_selection_and_kit_errors(tmp_path):
    p, _ = _kit(tmp_path / "sel", "--dry-run", GPU_CHECK_STAGES="env,bench")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(tmp_path / "sel")
    assert [s for s in STAGES if st[s]["status"] == "ok"] == ["env", "bench"]
    assert {st[s]["status"] for s in ("build", "check", "gpu_tests", "extra")} == {"skipped"}
    assert st["bench"]["limit"] > 400  # the plans of stages that do not run are not kept

    assert _kit("", "--dry-run")[0].returncode == 2  # no OUT_DIR
    assert _kit(tmp_path / "x", "--bogus")[0].returncode == 2
    assert _kit(tmp_path / "x", "--dry-run", "--rehearse")[0].returncode == 2
    assert _kit(tmp_path / "x", "--dry-run", GPU_CHECK_BUDGET_S="soon")[0].returncode == 2
    assert _kit(tmp_path / "x", "--dry-run", GPU_CHECK_STAGES="bench,ful")[0].returncode == 2
    short = _kit(tmp_path / "x", "--dry-run", GPU_CHECK_BUDGET_S=300)[0]
    assert short.returncode == 2 and "less than the correctness stages' plans" in short.stderr
    assert _kit(tmp_path / "x", "--dry-run", GPU_CHECK_PLAN_BUILD=300)[0].returncode == 2  # > cap
    assert not (tmp_path / "x").exists()  # settings are checked before anything is written
    (tmp_path / "file").write_text("")
    assert _kit(tmp_path / "file" / "sub", "--dry-run")[0].returncode == 2


@needs_shell
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_rehearsal_on_cpu_runs_the_real_check(tmp_path):
    """--rehearse: the real stages on CPU (here env and check: python -m sngm_ext --check from the
    bare checkout, Triton in its interpreter; the native build is off, so cpu is SKIPped)."""
    out = tmp_path / "out"
    p, _ = _kit(out, "--rehearse", timeout=300, GPU_CHECK_STAGES="env,check", SNGM_NO_JIT=1,
                GPU_CHECK_BUILD_DIR=tmp_path / "build")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert st["env"]["status"] == "ok" and st["check"]["status"] == "ok", p.stdout
    check = (out / "check.log").read_text()
    import torch

    from sngm_ext._selfcheck import cases

    n = len(cases(torch.device("cpu")))
    assert re.search(rf"^PASS triton on cpu: {n} cases", check, re.M), check
    assert f"sngm_ext from {ROOT}/sngm_ext" in (out / "env.txt").read_text()
    _check_logs_and_summary(out, p, st, mode="rehearse")


def _bare_python(code, tmp_path):
    """``code`` in a Python that sees the checkout and site-packages but processes no .pth file:
    no editable install (its finder is set up by a .pth), as on a machine where nothing was
    installed."""
    paths = [ROOT] + site.getsitepackages() + [os.path.dirname(os.__file__)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_bare_checkout_imports_both_gpu_backends(tmp_path):
    """With nothing installed, sngm_ext.triton_kernels is the checkout's own triton_kernels/
    (found by the Triton ops when they first run; importing sngm_ext imports no triton), and the
    native build finds the checkout's csrc/."""
    pytest.importorskip("triton")
    code = f"""
import sys
assert not any("editable" in type(f).__name__.lower() for f in sys.meta_path), sys.meta_path
import torch, sngm_ext
assert sngm_ext.__file__ == {os.path.join(ROOT, "sngm_ext", "__init__.py")!r}
assert "triton" not in sys.modules and "sngm_ext.triton_kernels" not in sys.modules
p = torch.nn.Parameter(torch.ones(10)); p.grad = torch.full((10,), 2.0)
opt = sngm_ext.SNGM([p], lr=0.1, backend="triton")
opt.step()
tk = sys.modules["sngm_ext.triton_kernels"]
assert tk.__file__ == {os.path.join(ROOT, "triton_kernels", "__init__.py")!r}, tk.__file__
assert sngm_ext.triton_kernels is tk
# one step from w = 1 on equal grads: bounds.FIRST_STEP_RTOL[torch.float32] (no tests/ on the
# path here), the fp32 expectation's own rounding within it too
assert torch.allclose(p.detach(), torch.full((10,), 1 - 0.1 / 10 ** 0.5), rtol=4 * 2.0**-24, atol=0)
from sngm_ext import _native_build
assert _native_build.csrc_dir() == {os.path.join(ROOT, "csrc")!r}
print("ok")
"""
    p = _bare_python(code, tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


def test_outside_a_checkout_no_other_triton_kernels_is_taken(tmp_path):
    """sngm_ext copied somewhere without the checkout around it (an install that lacks its
    subpackage), beside an unrelated top-level ``triton_kernels`` (a PyPI package of that name
    exists): the loader refuses, naming the module, and never loads the stranger."""
    shutil.copytree(os.path.join(ROOT, "sngm_ext"), tmp_path / "sngm_ext",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    (tmp_path / "triton_kernels").mkdir()
    (tmp_path / "triton_kernels" / "__init__.py").write_text("raise SystemExit('the stranger')\n")
    code = """
import sys
sys.path.insert(0, '.')
from sngm_ext._triton_kernels_path import load
try:
    load()
except ModuleNotFoundError as e:
    assert e.name == "sngm_ext.triton_kernels", e
    print("refused")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=dict(
        env, PYTHONPATH=os.pathsep.join(site.getsitepackages())), capture_output=True,
        text=True, timeout=120)
    assert p.stdout.strip() == "refused", p.stdout + p.stderr


# ------------------------------------------------------------------------ bench_step.py --budget-s


def _bench(out, *args):
    # Never a native build here (the test stays short); one thread, since two spinning threads on
    # a 2-core machine slow down many times over whenever the test's own process wakes up.
    env = dict(os.environ, SNGM_NO_JIT="1")
    return [sys.executable, BENCH, "--device", "cpu", "--threads", "1", "--rounds", "1",
            "--no-plot", "--out", str(out), *args], env


def test_bench_budget_writes_the_set(tmp_path):
    cmd, env = _bench(tmp_path, "--sets", "resnet20", "--budget-s", "20")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((tmp_path / "latest_cpu.json").read_text())
    assert [s["name"] for s in rep["sets"]] == ["resnet20"]
    assert rep["budget"]["finished"] and rep["budget"]["sets_done"] == ["resnet20"]
    assert rep["budget"]["skipped_sets"] == {} and rep["budget"]["elapsed_s"] < 20
    assert rep["sets"][0]["budget_s"] <= 10 and rep["sets"][0]["variants"]
    stamped = [f for f in os.listdir(tmp_path) if f.startswith("step_cpu_t1_")]
    assert sorted(os.path.splitext(f)[1] for f in stamped) == [".json", ".md"]
    assert "Time budget 20 s (--budget-s), finished: 1 of 1 sets" in (
        tmp_path / "latest_cpu.md").read_text()


def test_bench_budget_skips_sets_past_it(tmp_path):
    cmd, env = _bench(tmp_path, "--sets", "resnet20,resnet50", "--budget-s", "0")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads((tmp_path / "latest_cpu.json").read_text())
    assert rep["sets"] == [] and rep["budget"]["finished"]
    assert list(rep["budget"]["skipped_sets"]) == ["resnet20", "resnet50"]
    assert "skipped: resnet20 (not started" in p.stdout


def test_bench_budget_a_killed_run_keeps_the_sets_it_measured(tmp_path):
    cmd, env = _bench(tmp_path, "--sets", "resnet20,resnet50", "--budget-s", "60")
    latest = tmp_path / "latest_cpu.json"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(latest.read_text())["sets"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.25)
        running = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rep = json.loads(latest.read_text())
    assert [s["name"] for s in rep["sets"]][:1] == ["resnet20"]
    if running:  # killed while resnet50 was being measured: what was measured is on disk
        assert rep["budget"]["finished"] is False
        assert rep["budget"]["sets_planned"] == ["resnet20", "resnet50"]
        assert "in progress" in (tmp_path / "latest_cpu.md").read_text()


def test_the_gpu_tests_are_not_switched_to_the_interpreter():
    """Nothing in the test set-up turns TRITON_INTERPRET on by itself: with the variable unset the
    GPU tests skip only for want of a GPU here, and would compile Triton for real on one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        os.path.join(ROOT, "tests", "test_gpu.py"), "-k", "auto_prefers"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=120)
    assert "TRITON_INTERPRET=1" not in p.stdout, p.stdout
    assert "no CUDA device" in p.stdout or "passed" in p.stdout, p.stdout
