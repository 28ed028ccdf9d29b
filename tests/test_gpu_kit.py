"""The GPU verification kit without a GPU: scripts/gpu_check.sh --dry-run (its stages, timeouts,
failures, budget, status file and summary, with each stage's command replaced by a stand-in) and
benchmarks/bench_step.py --budget-s on CPU (results written per set, sets past the budget skipped,
a killed run keeps what it measured). A few seconds each; no GPU, no network.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIT = os.path.join(ROOT, "scripts", "gpu_check.sh")
BENCH = os.path.join(ROOT, "benchmarks", "bench_step.py")
STAGES = ["env", "build", "gpu_tests", "bench", "extra", "full"]
LOGS = {s: "env.txt" if s == "env" else f"{s}.log" for s in STAGES}

needs_shell = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout")


def _kit(out, *args, **env_over):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env["GPU_CHECK_PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in env_over.items()})
    t0 = time.perf_counter()
    p = subprocess.run(["bash", KIT, str(out), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    return p, time.perf_counter() - t0


def _status(out):
    with open(os.path.join(out, "status.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0].split("\t") == ["stage", "status", "seconds", "log", "note"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == STAGES, lines  # one line per stage, in order
    return {r[0]: {"status": r[1], "seconds": float(r[2]), "log": r[3], "note": r[4]} for r in rows}


def _check_logs_and_summary(out, p, st):
    for stage, row in st.items():
        assert row["log"] == LOGS[stage]
        path = os.path.join(out, row["log"])
        assert os.path.isfile(path) and os.path.getsize(path) > 0, stage
    assert "== gpu_check summary (dry-run)" in p.stdout
    assert "== key lines" in p.stdout
    for stage, row in st.items():
        assert f"-- {stage}: {row['status']}" in p.stdout
    with open(os.path.join(out, "summary.txt")) as f:
        assert f.read().strip() == p.stdout[p.stdout.index("== gpu_check summary"):].strip()


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
    assert json.loads((out / "env.json").read_text())["dry_run"] is True
    # the benchmark's targets reach the summary, met or not
    assert "target resnet20 sngm-cuda: step / fused SGD 1.40x (target <= 1.15x): MISSED" in p.stdout
    for name in ("gpu_tests.junit.xml", "extra.junit.xml"):
        assert (out / name).is_file()
    for d in ("bench", "bench_full"):
        rep = json.loads((out / d / "latest_gpu.json").read_text())
        assert rep["sets"][0]["name"] == "resnet20"
    # bench_step.py gets a --budget-s below its stage's limit (cap 120 s less the 15 s margin)
    bench_log = (out / "bench.log").read_text()
    assert "benchmarks/bench_step.py --device cuda --phases --budget-s 105.000 --out" in bench_log
    assert "TRITON_INTERPRET" in (out / "gpu_tests.log").read_text()
    assert st["bench"]["note"].startswith("2 of 3 sets measured (finished)")
    assert wall < 30


@needs_shell
def test_dry_run_timeout_and_failure_are_recorded_and_later_stages_run(tmp_path):
    out = tmp_path / "out"
    p, wall = _kit(out, "--dry-run", GPU_CHECK_BUDGET_S=60, GPU_CHECK_CAP_BENCH=1,
                   GPU_CHECK_DRY_TIMEOUT="bench", GPU_CHECK_DRY_FAIL="extra")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert {s: r["status"] for s, r in st.items()} == {
        "env": "ok", "build": "ok", "gpu_tests": "ok", "bench": "timeout", "extra": "failed",
        "full": "ok"}
    assert 0.9 <= st["bench"]["seconds"] < 5
    # killed after writing one set: the partial results are kept and reported
    assert st["bench"]["note"].startswith("timed out after 1.0 s; 1 of 3 sets measured (partial")
    assert json.loads((out / "bench" / "latest_gpu.json").read_text())["budget"]["finished"] is False
    assert "exit status 3" in st["extra"]["note"]
    _check_logs_and_summary(out, p, st)
    assert "sleeping past the limit" in (out / "bench.log").read_text()
    assert "last lines of bench.log" in p.stdout
    assert sum(r["seconds"] for r in st.values()) < 60 and wall < 30


@needs_shell
def test_dry_run_stops_at_the_budget(tmp_path):
    out = tmp_path / "out"
    p, wall = _kit(out, "--dry-run", GPU_CHECK_BUDGET_S=3, GPU_CHECK_RESERVE_S=0,
                   GPU_CHECK_MIN_STAGE_S=0.5, GPU_CHECK_KILL_AFTER_S=1,
                   GPU_CHECK_DRY_TIMEOUT="gpu_tests")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(out)
    assert [st[s]["status"] for s in STAGES] == ["ok", "ok", "timeout", "skipped", "skipped",
                                                 "skipped"]
    assert "of the budget left" in st["bench"]["note"]
    assert sum(r["seconds"] for r in st.values()) <= 3.5
    assert wall < 10
    _check_logs_and_summary(out, p, st)


@needs_shell
def test_stage_selection_and_kit_errors(tmp_path):
    p, _ = _kit(tmp_path / "sel", "--dry-run", GPU_CHECK_STAGES="env,bench")
    assert p.returncode == 0, p.stdout + p.stderr
    st = _status(tmp_path / "sel")
    assert [s for s in STAGES if st[s]["status"] == "ok"] == ["env", "bench"]
    assert {st[s]["status"] for s in ("build", "gpu_tests", "extra", "full")} == {"skipped"}

    assert _kit("", "--dry-run")[0].returncode == 2  # no OUT_DIR
    assert _kit(tmp_path / "x", "--bogus")[0].returncode == 2
    assert _kit(tmp_path / "x", "--dry-run", GPU_CHECK_BUDGET_S="soon")[0].returncode == 2
    assert _kit(tmp_path / "x", "--dry-run", GPU_CHECK_STAGES="bench,ful")[0].returncode == 2
    assert not (tmp_path / "x").exists()  # settings are checked before anything is written
    (tmp_path / "file").write_text("")
    assert _kit(tmp_path / "file" / "sub", "--dry-run")[0].returncode == 2


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
