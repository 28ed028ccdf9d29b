#!/usr/bin/env bash
# GPU verification kit: everything a rarely lent GPU machine should run, as one command, from a
# bare checkout (nothing installed: the checkout is put on PYTHONPATH).
#
#   bash scripts/gpu_check.sh OUT_DIR [--dry-run | --rehearse]
#
# Run from anywhere (it moves to the repository root). Stages, in order, each in its own process
# under `timeout`, each writing its log (and JSON / junit XML where it has one) into OUT_DIR:
#
#   env        nvidia-smi, python / torch / triton / nvcc versions          env.txt, env.json
#   build      the native CUDA module (then the CPU one), built ONCE into GPU_CHECK_BUILD_DIR,
#              the full compiler log kept; every later stage loads it from there (a stage that
#              would build again says so: "REBUILT")                         build.log
#   check      python -m sngm_ext --check: every backend against the reference on small cases;
#              fails unless triton and cuda both PASS on cuda                check.log
#   gpu_tests  tests/test_gpu.py -m "gpu and not gpu_extra" (Triton compiled) gpu_tests.log, .junit.xml
#   extra      tests/test_gpu_extra.py -m gpu_extra: large (40M fp32, a 2^31+ bf16 tensor) and
#              edge cases, CUDA-graph capture with and without a warm-up     extra.log, .junit.xml
#   bench      benchmarks/bench_step.py --device cuda --phases --sets GPU_CHECK_BENCH_SETS with
#              whatever time is left (it saves after every set)             bench.log, bench/
#
# Budget: GPU_CHECK_BUDGET_S (450 s) = the correctness stages' plans (env 15 + build 100 +
# check 45 + gpu_tests 90 + extra 75 = 325 s) + a GPU_CHECK_KILL_AFTER_S each (5 s: the grace of
# a stage stopped at its limit) + GPU_CHECK_RESERVE_S (5 s, the summary) + the benchmark (what is
# left: 95 s when every stage takes its whole plan). A correctness stage may run past its plan, up
# to its cap, but never into the time kept for the correctness stages after it: each of them
# always gets at least its plan, and only the benchmark is squeezed (skipped below
# GPU_CHECK_BENCH_MIN_S). The plans come from measurements (docs/gpu_verification.md#the-plan):
# the CUDA build's two files take 29 s and 39 s with nvcc 13 on 2 CPU cores; every Triton
# variant the launchers can compile (29: scripts/triton_aot_check.py, no integer specialization)
# takes at most 0.82 s with triton 3.6 (0.37 s on average), each once per kit (TRITON_CACHE_DIR).
#
# status.tsv: a header, then one line per stage: stage, status (ok / failed / timeout / skipped),
# seconds, planned seconds, limit, log file, note (why, for a failure). summary.txt (also printed
# at the end): the plan, status.tsv and the key lines ("kit-note: ...") of every stage, with the
# last lines of the log of a stage that failed. Exit status 0 whenever the kit ran (stage failures
# are in status.tsv); 2 for a kit error (usage, OUT_DIR, a bad setting, missing tools), 130 when
# interrupted.
#
# Environment (seconds may have decimals):
#   GPU_CHECK_BUDGET_S=450, GPU_CHECK_RESERVE_S=5
#   GPU_CHECK_PLAN_<STAGE>   the correctness stages' plans (ENV 15, BUILD 100, CHECK 45,
#                            GPU_TESTS 90, EXTRA 75)
#   GPU_CHECK_CAP_<STAGE>    hard caps: ENV 30, BUILD 240, CHECK 120, GPU_TESTS 240, EXTRA 240,
#                            BENCH 600
#   GPU_CHECK_MIN_STAGE_S=10 a correctness stage with less than this is skipped
#   GPU_CHECK_BENCH_MIN_S=30 the benchmark is skipped with less than this left
#   GPU_CHECK_BENCH_SETS=resnet20,resnet50,gpt2,decoder1b,counts
#   GPU_CHECK_BENCH_MARGIN_S=15   bench_step.py gets --budget-s = its limit minus this
#   GPU_CHECK_KILL_AFTER_S=5      SIGKILL this long after the SIGTERM of a timeout
#   GPU_CHECK_STAGES=a,b          run only these stages (the others: skipped), e.g. for a rerun
#   GPU_CHECK_BUILD_DIR=DIR       where the native modules and Triton's cache go, shared by every
#                                 stage and kept for a rerun (default build/gpu_check in the root)
#   GPU_CHECK_ARCHIVE=FILE.tgz    after every stage, OUT_DIR packed into FILE (for a machine that
#                                 returns few files: GPU_CHECK_ARCHIVE=$OUT/gpu_check.tgz)
#   GPU_CHECK_PYTHON / PYTHON     the interpreter (default: python, else python3)
#   TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16   exported for every stage unless already set
# --dry-run (any machine, a few seconds): the same plumbing, each stage's command replaced by a
# short stand-in that prints the command it stands for, its plan and limit, and writes the
# stage's JSON / XML.
#   GPU_CHECK_DRY_TIMEOUT=a,b     these stages' stand-ins sleep past their limit (the timeout path)
#   GPU_CHECK_DRY_FAIL=a,b        these stages' stand-ins exit 3 (the failure path)
#   GPU_CHECK_DRY_SLEEP_S=0       every other stand-in sleeps this long first; "plan": each
#                                 correctness stage's 4/5 of its plan (the schedule, timed)
#   GPU_CHECK_DRY_SLEEP_<STAGE>   the same for one stage (an overrun, say)
# --rehearse (a CPU machine, a few minutes): the real stages where a CPU can run them, Triton in
# its interpreter: env (no GPU needed), build (the CPU module only), check (triton and cpu on CPU
# tensors), gpu_tests (tests/test_gpu_power.py: the GPU tests' checks against broken kernels),
# extra (the GPU test files collected), bench (bench_step.py --device cpu --sets resnet20).
set -u

STAGES=(env build check gpu_tests extra bench)
CORRECTNESS=(env build check gpu_tests extra)  # always get their plan; bench takes what is left

die() { echo "gpu_check: $*" >&2; exit 2; }

usage() {
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "  (see the comments at the top of scripts/gpu_check.sh for stages, budget, outputs and variables)"
}

# ---------------------------------------------------------------------------------------- time

now_ms() {
  local t=${EPOCHREALTIME:-}
  if [ -n "$t" ]; then
    t=${t//[!0-9]/}
    echo $((10#$t / 1000))
  else
    echo $(($(date +%s%N) / 1000000))
  fi
}

# to_ms NAME VALUE: seconds (decimals allowed) to integer milliseconds; a kit error otherwise.
to_ms() {
  local v=$2 i f
  [[ $v =~ ^[0-9]+(\.[0-9]*)?$ ]] || die "$1=$v: expected seconds (e.g. 450 or 2.5)"
  i=${v%%.*}
  f=000
  [[ $v == *.* ]] && f="${v#*.}000"
  echo $((10#$i * 1000 + 10#${f:0:3}))
}

# secs MS: "12.345"
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
# secs1 MS: "12.3"
secs1() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }

in_list() {  # in_list WORD "a,b c": is WORD in the comma / space separated list?
  local w
  for w in ${2//,/ }; do [ "$w" = "$1" ] && return 0; done
  return 1
}

# ---------------------------------------------------------------------------------------- stages
# Each runs in its own process (this script again, under `timeout`), its stdout and stderr the
# stage's log. "kit-note: ..." lines are the key lines: the first goes into status.tsv, all of them
# into the summary. Variables from the parent: GC_OUT, GC_PY, GC_MODE (gpu / dry / rehearse),
# GC_DEVICE (cuda / cpu), GC_LIMIT_MS, GC_PLAN_MS, STAGE.

quote() { local q; printf -v q '%q ' "$@"; echo "${q% }"; }

note() { echo "kit-note: $([ "$GC_MODE" = dry ] && echo '[dry-run] ')$*"; }

# stand_in STAGE COMMAND...: --dry-run's replacement of COMMAND (prints it, then writes the stage's
# outputs with a short python, or sleeps past the limit, or fails, as the GPU_CHECK_DRY_* say).
stand_in() {
  local stage=$1
  shift
  echo "dry-run: would run: $(quote "$@")"
  echo "dry-run: $stage planned $(secs1 "$GC_PLAN_MS") s, limit $(secs1 "$GC_LIMIT_MS") s"
  local partial=0
  if in_list "$stage" "${GPU_CHECK_DRY_TIMEOUT:-}"; then
    case $stage in bench) partial=1 ;; *) partial=2 ;; esac
  elif in_list "$stage" "${GPU_CHECK_DRY_FAIL:-}"; then
    echo "dry-run: GPU_CHECK_DRY_FAIL: exiting 3"
    return 3
  fi
  local var="GPU_CHECK_DRY_SLEEP_${stage^^}" sleep
  sleep=${!var:-${GPU_CHECK_DRY_SLEEP_S:-0}}
  if [ "$sleep" = plan ]; then  # a correctness stage that keeps to its plan (its start included)
    sleep=0
    [ "$stage" = bench ] || sleep=$(secs $((GC_PLAN_MS * 4 / 5)))
  fi
  if [ "$partial" != 2 ]; then  # the stage's outputs (a benchmark's partial ones before a timeout)
    "$GC_PY" - "$stage" "$GC_OUT" "$sleep" "$partial" "$@" <<'EOF' || return
import json, os, platform, sys, time
stage, out, sleep, partial, cmd = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:]
time.sleep(0 if partial else sleep)
print(f"dry-run: {stage} stand-in (python {platform.python_version()})")

def junit(path, n_pass, n_skip):
    cases = "".join(f'<testcase classname="dry" name="test_{i}" time="0.01"/>' for i in range(n_pass))
    cases += "".join(f'<testcase classname="dry" name="test_skip_{i}"><skipped message="dry"/></testcase>'
                     for i in range(n_skip))
    with open(path, "w") as f:
        f.write('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
                f'errors="0" failures="0" skipped="{n_skip}" tests="{n_pass + n_skip}">{cases}'
                '</testsuite></testsuites>')

if stage == "env":
    print(f"kit-note: [dry-run] env stand-in, python {platform.python_version()}")
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump({"dry_run": True, "python": platform.python_version(), "gpu": "dry-run",
                   "driver": None, "torch": None, "triton": None, "nvcc": None}, f, indent=1)
elif stage == "build":
    print("sngm_ext native: {'cuda': {'how': 'built on first use', 'path': 'dry-run'}}")
elif stage == "check":
    for line in ("PASS triton on cuda: 9 cases, worst error 0.50 of its bound, 1.0 s",
                 "PASS cuda on cuda: 9 cases, worst error 0.50 of its bound, 1.0 s",
                 "SKIP cpu on cpu: dry-run", "check: all backends match the reference"):
        print(line)
elif stage in ("gpu_tests", "extra"):
    xml = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
    junit(xml, 3, 1)
    print("3 passed, 1 skipped in 0.01s")
elif stage == "bench":
    d = cmd[cmd.index("--out") + 1]
    b = float(cmd[cmd.index("--budget-s") + 1])
    os.makedirs(d, exist_ok=True)
    rows = [{"variant": v, "median_s": t, "ratio_vs_best_sgd": t / 1e-3}
            for v, t in (("sgd-fused", 1e-3), ("sngm-triton", 1.5e-3), ("sngm-cuda", 1.4e-3))]
    done = ["resnet20"] if partial else ["resnet20", "resnet50"]
    rep = {"schema": "sngm-ext/bench_step/1", "dry_run": True,
           "machine": {"device_name": "dry-run", "device": "cuda"},
           "copy": {"gbps": 1.0}, "errors": {}, "unavailable": {},
           "sets": [{"name": n, "numel": 269722, "n_tensors": 59, "best_sgd": "sgd-fused",
                     "variants": rows} for n in done],
           "targets": [{"set": "resnet20", "variant": "sngm-cuda", "what": "step / fused SGD",
                        "value": 1.4, "target": 1.15, "at_most": True, "met": False,
                        "line": "resnet20 sngm-cuda: step / fused SGD 1.40x (target <= 1.15x): MISSED"}],
           "budget": {"budget_s": b, "finished": not partial, "elapsed_s": 0.1,
                      "sets_planned": ["resnet20", "resnet50", "gpt2"], "sets_done": done,
                      "skipped_sets": {} if partial else {"gpt2": "not started: dry-run"}}}
    with open(os.path.join(d, "latest_gpu.json"), "w") as f:
        json.dump(rep, f)
EOF
  fi
  if [ "$partial" != 0 ]; then
    echo "dry-run: GPU_CHECK_DRY_TIMEOUT: sleeping past the limit ($(secs "$GC_LIMIT_MS") s)"
    exec sleep 3600
  fi
}

# run_or_stand_in STAGE COMMAND...: the command, or its stand-in under --dry-run.
run_or_stand_in() {
  local stage=$1
  shift
  if [ "$GC_MODE" = dry ]; then
    stand_in "$stage" "$@"
  else
    echo "+ $(quote "$@")"
    "$@"
  fi
}

# rebuilt_note LOG: a stage after `build` that built a native module again says so (the build
# stage's modules were not found: it cost this stage the build's time).
rebuilt_note() {
  if grep -q '^sngm_ext: building' "$1" 2>/dev/null; then
    note "REBUILT a native module in this stage: $(grep -m1 '^sngm_ext: building' "$1" | cut -c1-160)"
  fi
}

# junit_notes XML [require_one]: kit-notes on a junit file (counts, failures, recorded properties);
# exit 10 when require_one is set and no test passed, 11 when the file is missing or unreadable.
junit_notes() {
  "$GC_PY" - "$@" <<'EOF'
import sys
import xml.etree.ElementTree as ET
path = sys.argv[1]
require = len(sys.argv) > 2 and sys.argv[2] == "require_one"
try:
    root = ET.parse(path).getroot()
except Exception as e:
    print(f"kit-note: no junit results (pytest did not write {path.rsplit('/', 1)[-1]})")
    sys.exit(11)
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
for s in suites:
    for k in tot:
        tot[k] += int(s.get(k, 0) or 0)
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"kit-note: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, "
      f"{tot['skipped']} skipped (junit: {path.rsplit('/', 1)[-1]})")
bad, skips = [], {}
for c in root.iter("testcase"):
    name = f"{c.get('classname', '')}::{c.get('name', '')}"
    for tag in ("failure", "error"):
        e = c.find(tag)
        if e is not None:
            msg = (e.get("message") or "").splitlines()[0][:160] if e.get("message") else ""
            bad.append(f"{tag.upper()} {name}: {msg}")
    s = c.find("skipped")
    if s is not None:
        why = (s.get("message") or "")[:120]
        skips[why] = skips.get(why, 0) + 1
    for p in c.iter("property"):
        print(f"kit-note: {name}: {p.get('name')} = {p.get('value')}")
for line in bad[:25]:
    print(f"kit-note: {line}")
if len(bad) > 25:
    print(f"kit-note: ... and {len(bad) - 25} more")
for why, n in sorted(skips.items(), key=lambda kv: -kv[1])[:5]:
    print(f"kit-note: skipped {n}: {why}")
if require and passed == 0:
    print("kit-note: no test ran (all skipped or none collected): counted as failed")
    sys.exit(10)
EOF
}

# bench_notes DIR: kit-notes on DIR/latest_gpu.json (sets measured, the fused backends vs SGD).
bench_notes() {
  "$GC_PY" - "$1" <<'EOF'
import json, os, sys
path = os.path.join(sys.argv[1], "latest_gpu.json")
if not os.path.exists(path):  # --rehearse measures on CPU
    path = os.path.join(sys.argv[1], "latest_cpu.json")
try:
    with open(path) as f:
        rep = json.load(f)
except Exception as e:
    print(f"kit-note: no results (no {path.rsplit('/', 2)[-2]}/latest_gpu.json written)")
    sys.exit(11)
b = rep.get("budget") or {}
sets = rep.get("sets", [])
planned = b.get("sets_planned") or [s["name"] for s in sets]
state = "" if not b else (" (finished)" if b.get("finished") else " (partial: the run did not finish)")
print(f"kit-note: {len(sets)} of {len(planned)} sets measured{state}; "
      f"{rep.get('machine', {}).get('device_name')}, copy {rep.get('copy', {}).get('gbps', 0):.0f} GB/s")
for s in sets:
    parts = []
    for r in s.get("variants", []):
        if r["variant"] in ("sngm-cuda", "sngm-triton", "sgd-fused", s.get("best_sgd")):
            ratio = r.get("ratio_vs_best_sgd")
            parts.append(f"{r['variant']} {r['median_s'] * 1e3:.3f} ms"
                         + (f" ({ratio:.2f}x)" if ratio is not None else ""))
    print(f"kit-note: {s['name']}: " + ", ".join(dict.fromkeys(parts)))
for t in rep.get("targets", []):  # bench_step.py formats each line (target_line)
    print(f"kit-note: target {t['line']}")
for k, v in (b.get("skipped_sets") or {}).items():
    print(f"kit-note: {k}: skipped, {v}")
for k, v in (rep.get("errors") or {}).items():
    print(f"kit-note: {k}: {v}")
for k, v in (rep.get("unavailable") or {}).items():
    print(f"kit-note: not measured: {k} ({v})")
sys.exit(0 if sets else 12)
EOF
}

stage_env() {
  if [ "$GC_MODE" = dry ]; then
    run_or_stand_in env nvidia-smi
    return
  fi
  echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname 2>/dev/null), $(nproc 2>/dev/null) CPUs"
  echo "== nvidia-smi"
  nvidia-smi 2>&1 || echo "(nvidia-smi failed: $?)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1 || true
  echo "== nvcc"
  if command -v nvcc >/dev/null; then nvcc --version; elif [ -x /usr/local/cuda/bin/nvcc ]; then
    /usr/local/cuda/bin/nvcc --version; else echo "(no nvcc on PATH or in /usr/local/cuda/bin)"; fi
  echo "== ninja $(ninja --version 2>/dev/null || echo missing), $(c++ --version 2>/dev/null | head -1)"
  echo "== git $(git rev-parse HEAD 2>/dev/null || echo '?')$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo ' (dirty)')"
  echo "== sngm_ext from $(dirname "$("$GC_PY" -c 'import sngm_ext; print(sngm_ext.__file__)' 2>&1)")" \
    "(PYTHONPATH=$PYTHONPATH)"
  echo "== python"
  "$GC_PY" - "$GC_OUT/env.json" <<'EOF'
import json, os, platform, re, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
q = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader")
if q:
    parts = [p.strip() for p in q.splitlines()[0].split(",")]
    info.update(gpu=parts[0], driver=parts[1] if len(parts) > 1 else None,
                gpu_memory=parts[2] if len(parts) > 2 else None,
                compute_cap=parts[3] if len(parts) > 3 else None, gpu_count=len(q.splitlines()))
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
m = re.search(r"release ([0-9.]+)", run(nvcc, "--version")) if nvcc else None
info["nvcc"] = m.group(1) if m else None
info["nvcc_path"] = nvcc
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(torch_device=p.name, capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                    total_memory=p.total_memory)
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
for mod in ("triton", "numpy", "pytest", "pybind11", "matplotlib", "ninja", "setuptools"):
    try:
        from importlib.metadata import version
        info[mod] = version(mod)
    except Exception:
        info.setdefault(mod, None)
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
for k, v in info.items():
    print(f"{k}: {v}")
print(f"kit-note: {info.get('gpu', 'no GPU (nvidia-smi)')}, driver {info.get('driver')}, "
      f"torch {info.get('torch')} (CUDA {info.get('torch_cuda')}, available: "
      f"{info.get('cuda_available')}), triton {info.get('triton')}, nvcc {info.get('nvcc')}, "
      f"python {info['python']}")
sys.exit(0 if info.get("cuda_available") or os.environ.get("GC_DEVICE") == "cpu" else 1)
EOF
}

# build: each native module loaded (built unless cached in SNGM_EXTENSIONS_DIR) in a process of
# its own, the compiler's output in full (SNGM_VERBOSE_BUILD=1). CUDA first: the GPU stages need
# it; the CPU module only serves the bf16-vs-CPU test and --check's cpu line.
stage_build() {
  local parts=(cuda cpu) part rc=0
  [ "$GC_DEVICE" = cpu ] && parts=(cpu)
  echo "== build into SNGM_EXTENSIONS_DIR=$SNGM_EXTENSIONS_DIR (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS); Triton's cache: TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
  if [ "$GC_MODE" = dry ]; then
    run_or_stand_in build "$GC_PY" -c "from sngm_ext import native; native.load_ops('cuda'); native.load_ops('cpu')"
    return
  fi
  for part in "${parts[@]}"; do
    echo "== native.load_ops('$part')"
    SNGM_VERBOSE_BUILD=1 "$GC_PY" - "$part" <<'EOF'
import sys, time
part = sys.argv[1]
from sngm_ext import native
t0 = time.perf_counter()
try:
    native.load_ops(part)
except Exception as e:
    print(e)
    print(f"kit-note: the {part.upper()} module does not load: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    sys.exit(1)
info = native.info().get(part, {})
print(f"kit-note: {part.upper()} module {info.get('how')} in {time.perf_counter() - t0:.1f} s: {info.get('path')}")
EOF
    case "$part:$?" in
      *:0) ;;
      "$GC_DEVICE":*) rc=1 ;;  # the device's module is required
      *) note "(the $part module is optional here)" ;;
    esac
  done
  return "$rc"
}

# check: python -m sngm_ext --check, which must PASS triton and (on a GPU) cuda on the device.
stage_check() {
  local rc need
  if [ "$GC_DEVICE" = cpu ]; then
    run_or_stand_in check env TRITON_INTERPRET=1 "$GC_PY" -m sngm_ext --check
  else
    run_or_stand_in check env -u TRITON_INTERPRET "$GC_PY" -m sngm_ext --check
  fi 2>&1 | tee "$GC_OUT/.check.out"
  rc=${PIPESTATUS[0]}
  grep -E '^(PASS|FAIL|SKIP) ' "$GC_OUT/.check.out" | while IFS= read -r line; do note "$line"; done
  for need in triton $([ "$GC_DEVICE" = cuda ] && echo cuda); do
    if ! grep -q "^PASS $need on $GC_DEVICE:" "$GC_OUT/.check.out"; then
      note "$need did not PASS on $GC_DEVICE"
      [ "$rc" = 0 ] && rc=1
    fi
  done
  rm -f "$GC_OUT/.check.out"
  rebuilt_note "$GC_OUT/check.log"
  return "$rc"
}

# pytest_stage XML PYTEST_ARGS...: pytest with TRITON_INTERPRET unset (Triton compiled for real)
# on a GPU, set under --rehearse; notes from the junit file; fails when no test ran.
pytest_stage() {
  local xml=$1 rc jrc interp=(-u TRITON_INTERPRET)
  shift
  rm -f "$xml"
  [ "$GC_DEVICE" = cpu ] && interp=(TRITON_INTERPRET=1)
  run_or_stand_in "$STAGE" env "${interp[@]}" "$GC_PY" -m pytest -p no:cacheprovider -rA \
    --junitxml="$xml" "$@"
  rc=$?
  echo "== pytest exit status $rc"
  case $rc in 0 | 1 | 5) ;; *) note "pytest exit status $rc (2: interrupted, 3: internal error, 4: usage error)" ;; esac
  junit_notes "$xml" require_one
  jrc=$?
  [ "$rc" = 0 ] && [ "$jrc" != 0 ] && rc=1
  rebuilt_note "$GC_OUT/$STAGE.log"
  return "$rc"
}

stage_gpu_tests() {
  if [ "$GC_DEVICE" = cpu ]; then  # the GPU tests' checks, on CPU, against broken kernels
    pytest_stage "$GC_OUT/gpu_tests.junit.xml" -q tests/test_gpu_power.py
  else
    pytest_stage "$GC_OUT/gpu_tests.junit.xml" -v tests/test_gpu.py -m "gpu and not gpu_extra"
  fi
}

stage_extra() {
  if [ "$GC_DEVICE" = cpu ]; then  # no CUDA: the GPU test files must at least import and collect
    run_or_stand_in extra "$GC_PY" -m pytest -p no:cacheprovider --collect-only -q \
      tests/test_gpu.py tests/test_gpu_extra.py
    local rc=$?
    if [ "$rc" = 0 ]; then
      note "the GPU test files collect (they run on a GPU only)"
    else
      note "the GPU test files do not collect (pytest exit status $rc)"
    fi
    return "$rc"
  fi
  pytest_stage "$GC_OUT/extra.junit.xml" -v tests/test_gpu_extra.py -m gpu_extra
}

# bench_budget_s: the stage limit less GPU_CHECK_BENCH_MARGIN_S (the process's start and end);
# half the limit where that would leave less than half.
bench_budget_s() {
  local margin lim=$GC_LIMIT_MS
  margin=$(to_ms GPU_CHECK_BENCH_MARGIN_S "${GPU_CHECK_BENCH_MARGIN_S:-15}")
  if [ $((lim - margin)) -lt $((lim / 2)) ]; then secs $((lim / 2)); else secs $((lim - margin)); fi
}

stage_bench() {
  local dir=$GC_OUT/bench rc args
  rm -f "$dir"/latest_gpu.json "$dir"/latest_gpu.md "$dir"/latest_gpu.png "$dir"/latest_cpu.*
  if [ "$GC_DEVICE" = cpu ]; then
    args=(--device cpu --threads 1 --rounds 1 --no-plot --sets resnet20)
  else
    args=(--device cuda --phases --sets "${GPU_CHECK_BENCH_SETS:-resnet20,resnet50,gpt2,decoder1b,counts}")
  fi
  run_or_stand_in bench "$GC_PY" benchmarks/bench_step.py "${args[@]}" \
    --budget-s "$(bench_budget_s)" --out "$dir"
  rc=$?
  echo "== bench_step.py exit status $rc"
  [ "$rc" = 0 ] || note "bench_step.py exit status $rc"
  bench_notes "$dir" || { [ "$rc" = 0 ] && rc=1; }  # a run that measured nothing is a failure
  return "$rc"
}

# ---------------------------------------------------------------------------------------- driver

status_line() {  # status_line STAGE STATUS MS PLAN_MS LIMIT_MS LOG NOTE
  local n=${7//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$(secs1 "$3")" "$(secs1 "$4")" "$(secs1 "$5")" \
    "$6" "${n:0:200}" >>"$OUT/status.tsv"
}

archive() {
  [ -n "${GPU_CHECK_ARCHIVE:-}" ] || return 0
  local a=$GPU_CHECK_ARCHIVE tmp
  tmp="$a.tmp$$"
  if tar -czf "$tmp" --exclude="$(basename -- "$a")*" -C "$(dirname -- "$OUT")" "$(basename -- "$OUT")" 2>/dev/null; then
    mv -f -- "$tmp" "$a"
  else
    rm -f -- "$tmp"
    echo "gpu_check: could not write the archive $a" >&2
  fi
}

CUR_PID=""
INTERRUPTED=0
on_signal() {
  INTERRUPTED=1
  [ -n "$CUR_PID" ] && kill -TERM "$CUR_PID" 2>/dev/null
}

log_name() { if [ "$1" = env ]; then echo env.txt; else echo "$1.log"; fi; }

is_correctness() { in_list "$1" "${CORRECTNESS[*]}"; }
selected() { [ -z "${GPU_CHECK_STAGES:-}" ] || in_list "$1" "$GPU_CHECK_STAGES"; }

# later_plans_ms STAGE: the time kept for the selected correctness stages after STAGE: each one's
# plan, and the KILL_AFTER_S a stage stopped at its limit may take to end.
later_plans_ms() {
  local s after=0 sum=0
  for s in "${CORRECTNESS[@]}"; do
    if [ "$after" = 1 ] && selected "$s"; then sum=$((sum + ${PLAN[$s]} + KILL_AFTER_MS)); fi
    [ "$s" = "$1" ] && after=1
  done
  echo "$sum"
}

# run_stage STAGE
run_stage() {
  local stage=$1 cap=${CAPS[$1]} plan=0 min log left avail limit t0 t1 rc status note
  log=$(log_name "$stage")
  left=$((BUDGET_MS - RESERVE_MS - ($(now_ms) - T0)))
  if is_correctness "$stage"; then
    plan=${PLAN[$stage]}
    min=$MIN_STAGE_MS
    avail=$((left - $(later_plans_ms "$stage")))
  else
    min=$BENCH_MIN_MS
    avail=$left
  fi
  # A stage stopped at its limit may take KILL_AFTER_S more to end: that time is not the next's.
  avail=$((avail - KILL_AFTER_MS))
  [ "$stage" = bench ] && plan=$((avail > 0 ? avail : 0))
  if [ "$INTERRUPTED" = 1 ]; then
    status=skipped note="interrupted"
  elif ! selected "$stage"; then
    status=skipped note="not in GPU_CHECK_STAGES"
  elif [ "$avail" -lt "$min" ] || [ "$avail" -le 0 ]; then
    status=skipped note="$(secs1 $((avail > 0 ? avail : 0))) s of the budget left for it (needs $(secs1 "$min") s)"
  else
    status=""
  fi
  if [ -n "$status" ]; then
    echo "kit-note: skipped: $note" >"$OUT/$log"
    status_line "$stage" skipped 0 "$plan" 0 "$log" "$note"
    printf '[gpu_check %6s s] %-9s skipped (%s)\n' "$(secs1 $(($(now_ms) - T0)))" "$stage" "$note"
    archive
    return
  fi
  limit=$((cap < avail ? cap : avail))
  printf '[gpu_check %6s s] %-9s started, planned %s s, limit %s s, log %s\n' \
    "$(secs1 $(($(now_ms) - T0)))" "$stage" "$(secs1 "$plan")" "$(secs1 "$limit")" "$log"
  t0=$(now_ms)
  GC_LIMIT_MS=$limit GC_PLAN_MS=$plan STAGE=$stage timeout --kill-after="$KILL_AFTER_S" \
    "$(secs "$limit")" "${DEFAULT_PIPE[@]}" bash "$SELF" __stage "$stage" >"$OUT/$log" 2>&1 </dev/null &
  CUR_PID=$!
  while :; do
    wait "$CUR_PID"
    rc=$?
    kill -0 "$CUR_PID" 2>/dev/null || break  # wait was cut short by a trapped signal: again
  done
  CUR_PID=""
  t1=$(now_ms)
  note=$(grep -m1 '^kit-note: ' "$OUT/$log" | sed 's/^kit-note: //')
  if [ "$INTERRUPTED" = 1 ]; then
    status=failed
    note="interrupted${note:+; $note}"
    echo "kit-note: interrupted (exit $rc)" >>"$OUT/$log"
  elif [ "$rc" = 0 ]; then
    status=ok
  elif [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ $((t1 - t0)) -ge "$limit" ]; }; then
    status=timeout
    echo "kit-note: timed out after $(secs1 "$limit") s (exit $rc)" >>"$OUT/$log"
    local partial=""
    if [ "$stage" = bench ]; then  # what the benchmark wrote before it was stopped
      partial=$(GC_PY=$PY bench_notes "$OUT/bench" 2>&1)
    fi
    if [ -n "$partial" ]; then
      echo "$partial" >>"$OUT/$log"
      note=$(echo "$partial" | grep -m1 '^kit-note: ' | sed 's/^kit-note: //')
    fi
    note="timed out after $(secs1 "$limit") s${note:+; $note}"
  else
    status=failed
    # why: the first key line that names a failure, else the first key line, else the exit status
    note=$(grep -m1 -E '^kit-note: .*(FAIL|ERROR|does not|did not|no test|no junit|exit status|REBUILT)' \
      "$OUT/$log" | sed 's/^kit-note: //')
    [ -z "$note" ] && note=$(grep -m1 '^kit-note: ' "$OUT/$log" | sed 's/^kit-note: //')
    note="${note:-exit $rc}"
  fi
  status_line "$stage" "$status" $((t1 - t0)) "$plan" "$limit" "$log" "$note"
  printf '[gpu_check %6s s] %-9s %s in %s s%s\n' "$(secs1 $((t1 - T0)))" "$stage" "$status" \
    "$(secs1 $((t1 - t0)))" "${note:+: ${note:0:120}}"
  archive
}

plan_line() {  # the budget, split: what each correctness stage is sure of, the rest the bench's
  local s parts=() sum=0 n=0
  for s in "${CORRECTNESS[@]}"; do
    parts+=("$s $(secs1 "${PLAN[$s]}")")
    sum=$((sum + ${PLAN[$s]}))
    n=$((n + 1))
  done
  echo "plan (s): ${parts[*]/%/ +} kill grace $n x $(secs1 "$KILL_AFTER_MS") + bench" \
    "$(secs1 $((BUDGET_MS - RESERVE_MS - sum - n * KILL_AFTER_MS))) (what is left) + reserve" \
    "$(secs1 "$RESERVE_MS") = budget $(secs1 "$BUDGET_MS")"
}

summary() {
  local stage status s plan lim log n
  {
    echo "== gpu_check summary$([ "$MODE" != gpu ] && echo " ($MODE)"): $(secs1 $(($(now_ms) - T0))) s of a $(secs1 "$BUDGET_MS") s budget, in $OUT"
    plan_line
    if command -v column >/dev/null; then column -t -s $'\t' "$OUT/status.tsv"; else cat "$OUT/status.tsv"; fi
    echo "== key lines"
    while IFS=$'\t' read -r stage status s plan lim log n; do
      [ "$stage" = stage ] && continue
      echo "-- $stage: $status"
      [ -f "$OUT/$log" ] || continue
      awk '/^kit-note: / && n++ < 40 { print "   " substr($0, 11) }' "$OUT/$log"
      if [ "$status" = failed ] || [ "$status" = timeout ]; then
        echo "   last lines of $log:"
        grep -v '^kit-note: ' "$OUT/$log" | tail -n 12 | sed 's/^/   | /'
      fi
    done <"$OUT/status.tsv"
  } >"$OUT/summary.txt" 2>&1
  cat "$OUT/summary.txt"
}

main() {
  local a out_arg="" stage var sum=0
  MODE=gpu
  for a in "$@"; do
    case "$a" in
      --dry-run) [ "$MODE" = gpu ] || die "--dry-run and --rehearse exclude each other"; MODE=dry ;;
      --rehearse) [ "$MODE" = gpu ] || die "--dry-run and --rehearse exclude each other"; MODE=rehearse ;;
      -h | --help) usage; exit 0 ;;
      -*) usage >&2; die "unknown option: $a" ;;
      *) [ -z "$out_arg" ] || die "one OUT_DIR only (got '$out_arg' and '$a')"; out_arg=$a ;;
    esac
  done
  [ -n "$out_arg" ] || { usage >&2; die "OUT_DIR is missing"; }

  # settings first: a bad one is a kit error before anything is written
  BUDGET_MS=$(to_ms GPU_CHECK_BUDGET_S "${GPU_CHECK_BUDGET_S:-450}") || exit 2
  RESERVE_MS=$(to_ms GPU_CHECK_RESERVE_S "${GPU_CHECK_RESERVE_S:-5}") || exit 2
  MIN_STAGE_MS=$(to_ms GPU_CHECK_MIN_STAGE_S "${GPU_CHECK_MIN_STAGE_S:-10}") || exit 2
  BENCH_MIN_MS=$(to_ms GPU_CHECK_BENCH_MIN_S "${GPU_CHECK_BENCH_MIN_S:-30}") || exit 2
  to_ms GPU_CHECK_BENCH_MARGIN_S "${GPU_CHECK_BENCH_MARGIN_S:-15}" >/dev/null || exit 2
  KILL_AFTER_S=${GPU_CHECK_KILL_AFTER_S:-5}
  KILL_AFTER_MS=$(to_ms GPU_CHECK_KILL_AFTER_S "$KILL_AFTER_S") || exit 2
  declare -gA PLAN=([env]=15 [build]=100 [check]=45 [gpu_tests]=90 [extra]=75)
  declare -gA CAPS=([env]=30 [build]=240 [check]=120 [gpu_tests]=240 [extra]=240 [bench]=600)
  for stage in "${STAGES[@]}"; do
    var="GPU_CHECK_CAP_${stage^^}"
    CAPS[$stage]=$(to_ms "$var" "${!var:-${CAPS[$stage]}}") || exit 2
  done
  for stage in "${CORRECTNESS[@]}"; do
    var="GPU_CHECK_PLAN_${stage^^}"
    PLAN[$stage]=$(to_ms "$var" "${!var:-${PLAN[$stage]}}") || exit 2
    [ "${PLAN[$stage]}" -le "${CAPS[$stage]}" ] || die "$var exceeds the stage's cap"
  done
  a=${GPU_CHECK_STAGES:-}
  for a in ${a//,/ }; do
    in_list "$a" "${STAGES[*]}" || die "GPU_CHECK_STAGES: unknown stage '$a' (stages: ${STAGES[*]})"
  done
  for stage in "${CORRECTNESS[@]}"; do
    selected "$stage" && sum=$((sum + ${PLAN[$stage]} + KILL_AFTER_MS))
  done
  [ $((sum + RESERVE_MS)) -le "$BUDGET_MS" ] || die "GPU_CHECK_BUDGET_S=$(secs1 "$BUDGET_MS") is less than the correctness stages' plans, their GPU_CHECK_KILL_AFTER_S and the reserve ($(secs1 $((sum + RESERVE_MS))) s): every one of them must fit"

  ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot find the repository root"
  [ -f "$ROOT/benchmarks/bench_step.py" ] && [ -d "$ROOT/sngm_ext" ] \
    || die "$ROOT does not look like the sngm-ext repository"
  SELF="$ROOT/scripts/gpu_check.sh"
  mkdir -p -- "$out_arg" 2>/dev/null || die "cannot create OUT_DIR $out_arg"
  OUT=$(cd -- "$out_arg" && pwd) || die "cannot enter OUT_DIR $out_arg"
  [ -w "$OUT" ] || die "OUT_DIR $OUT is not writable"
  cd -- "$ROOT" || die "cannot enter $ROOT"

  command -v timeout >/dev/null || die "'timeout' (coreutils) is not on PATH"
  PY=${GPU_CHECK_PYTHON:-${PYTHON:-}}
  if [ -z "$PY" ]; then
    if command -v python >/dev/null; then PY=python; else PY=python3; fi
  fi
  command -v "$PY" >/dev/null || die "no python ($PY) on PATH"
  BUILD_DIR=${GPU_CHECK_BUILD_DIR:-$ROOT/build/gpu_check}
  [ "$MODE" = dry ] || mkdir -p -- "$BUILD_DIR" || die "cannot create GPU_CHECK_BUILD_DIR $BUILD_DIR"

  export GC_OUT=$OUT GC_PY=$PY GC_MODE=$MODE PYTHONUNBUFFERED=1
  export GC_DEVICE=$([ "$MODE" = rehearse ] && echo cpu || echo cuda)
  # The checkout itself, never an install: sngm_ext and its triton_kernels/ from here.
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  # One build of each native module and one compile of each Triton variant, for every stage.
  export SNGM_EXTENSIONS_DIR=$BUILD_DIR/extensions TRITON_CACHE_DIR=$BUILD_DIR/triton_cache
  # The H200 / H100 arch for every build, the kit's and a first use's alike (one cached build).
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  T0=$(now_ms)
  printf 'stage\tstatus\tseconds\tplanned\tlimit\tlog\tnote\n' >"$OUT/status.tsv" || die "cannot write $OUT/status.tsv"
  rm -f -- "$OUT/summary.txt"
  trap 'on_signal' INT TERM HUP
  # A closed stdout (`| head`) must not stop the kit (its record is in OUT_DIR); the stages get
  # SIGPIPE back where env can give it (GNU env --default-signal).
  DEFAULT_PIPE=()
  env --default-signal=PIPE true 2>/dev/null && DEFAULT_PIPE=(env --default-signal=PIPE)
  trap '' PIPE
  echo "[gpu_check] $(date -u +%Y-%m-%dT%H:%M:%SZ) budget $(secs1 "$BUDGET_MS") s, out $OUT, python $PY, build $BUILD_DIR$([ "$MODE" != gpu ] && echo ", ${MODE^^}")"
  echo "[gpu_check] $(plan_line)"
  for stage in "${STAGES[@]}"; do
    run_stage "$stage"
  done
  trap - INT TERM HUP
  summary
  archive
  [ "$INTERRUPTED" = 1 ] && exit 130
  exit 0
}

if [ "${1:-}" = __stage ]; then  # one stage, in its own process (see run_stage)
  cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." || exit 2
  "stage_$2"
  exit $?
fi
main "$@"
