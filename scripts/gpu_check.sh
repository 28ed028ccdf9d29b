#!/usr/bin/env bash
# GPU verification kit: everything a rarely lent GPU machine should run, as one command.
#
#   bash scripts/gpu_check.sh OUT_DIR [--dry-run]
#
# Run from the repository root (it works from elsewhere too: it moves to the root, never away).
# Stages, in order, each under `timeout` with the lesser of its cap and what is left of the total
# budget (GPU_CHECK_BUDGET_S, default 450 s), each writing its log (and JSON / junit XML where it
# has one) into OUT_DIR as it runs:
#
#   env        nvidia-smi, python / torch / triton / nvcc versions      env.txt, env.json
#   build      pip install -e . offline (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16), else the
#              first-use build; says whether the CUDA module was prebuilt or built on first use
#                                                                        build.log
#   gpu_tests  tests/test_gpu.py -m "gpu and not gpu_extra", TRITON_INTERPRET unset (Triton
#              compiled for real; the stage fails if no test ran)      gpu_tests.log, .junit.xml
#   bench      benchmarks/bench_step.py --device cuda --phases --budget-s ...   bench.log, bench/
#   extra      the gpu_extra checks (tests/test_gpu_extra*.py, tests/test_gpu.py); none
#              collected counts as ok                                  extra.log, extra.junit.xml
#   full       bench_step.py --full with the time left (at least GPU_CHECK_FULL_MIN_S)
#                                                                        full.log, bench_full/
#
# status.tsv: a header, then one line per stage: stage, status (ok / failed / timeout / skipped),
# seconds, log file (in OUT_DIR), note. summary.txt (also printed at the end): status.tsv and the
# key lines of each stage. Exit status 0 whenever the kit ran (stage failures are in status.tsv);
# 2 for a kit error (usage, OUT_DIR, missing tools), 130 when interrupted.
#
# Environment (seconds may have decimals):
#   GPU_CHECK_BUDGET_S=450        total budget; GPU_CHECK_RESERVE_S=5 of it is kept for the summary
#   GPU_CHECK_CAP_<STAGE>         per-stage caps: ENV 30, BUILD 240, GPU_TESTS 150, BENCH 120,
#                                 EXTRA 90, FULL 600
#   GPU_CHECK_MIN_STAGE_S=10      a stage with less than this left is skipped
#   GPU_CHECK_FULL_MIN_S=45       the same, for the full benchmark
#   GPU_CHECK_BENCH_MARGIN_S=15   bench_step.py gets --budget-s = its stage limit minus this
#   GPU_CHECK_KILL_AFTER_S=5      SIGKILL this long after the SIGTERM of a timeout
#   GPU_CHECK_STAGES=a,b          run only these stages (the others: skipped), e.g. for a rerun
#   GPU_CHECK_ARCHIVE=FILE.tgz    after every stage, OUT_DIR packed into FILE (for a machine that
#                                 returns few files: GPU_CHECK_ARCHIVE=$OUT/gpu_check.tgz)
#   GPU_CHECK_PYTHON / PYTHON     the interpreter (default: python, else python3)
#   TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16   exported for every stage unless already set
# --dry-run (any machine, no GPU, a few seconds): the same plumbing, each stage's command replaced
# by a short stand-in that prints the command it stands for and writes the stage's JSON / XML.
#   GPU_CHECK_DRY_TIMEOUT=a,b     these stages' stand-ins sleep past their limit (the timeout path)
#   GPU_CHECK_DRY_FAIL=a,b        these stages' stand-ins exit 3 (the failure path)
#   GPU_CHECK_DRY_SLEEP_S=0       every other stand-in sleeps this long first
set -u

STAGES=(env build gpu_tests bench extra full)

die() { echo "gpu_check: $*" >&2; exit 2; }

usage() {
  sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "  (see the comments at the top of scripts/gpu_check.sh for stages, outputs and variables)"
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
# into the summary. Variables from the parent: GC_OUT, GC_PY, GC_DRY, GC_LIMIT_MS.

quote() { local q; printf -v q '%q ' "$@"; echo "${q% }"; }

note() { echo "kit-note: $([ "${GC_DRY:-0}" = 1 ] && echo '[dry-run] ')$*"; }

# stand_in STAGE COMMAND...: --dry-run's replacement of COMMAND (prints it, then writes the stage's
# outputs with a short python, or sleeps past the limit, or fails, as the GPU_CHECK_DRY_* say).
stand_in() {
  local stage=$1
  shift
  echo "dry-run: would run: $(quote "$@")"
  local partial=0
  if in_list "$stage" "${GPU_CHECK_DRY_TIMEOUT:-}"; then
    case $stage in bench | full) partial=1 ;; *) partial=2 ;; esac
  elif in_list "$stage" "${GPU_CHECK_DRY_FAIL:-}"; then
    echo "dry-run: GPU_CHECK_DRY_FAIL: exiting 3"
    return 3
  fi
  if [ "$partial" != 2 ]; then  # the stage's outputs (a benchmark's partial ones before a timeout)
    "$GC_PY" - "$stage" "$GC_OUT" "${GPU_CHECK_DRY_SLEEP_S:-0}" "$partial" "$@" <<'EOF' || return
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
    print("sngm_ext native: {'cuda': {'how': 'prebuilt', 'path': 'dry-run'}}")
elif stage in ("gpu_tests", "extra"):
    xml = cmd[cmd.index("--junitxml") + 1] if "--junitxml" in cmd else None
    xml = xml or next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
    junit(xml, 3, 1)
    print("3 passed, 1 skipped in 0.01s")
elif stage in ("bench", "full"):
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
  if [ "$GC_DRY" = 1 ]; then
    stand_in "$stage" "$@"
  else
    echo "+ $(quote "$@")"
    "$@"
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
  if [ "$GC_DRY" = 1 ]; then
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
sys.exit(0 if info.get("cuda_available") else 1)
EOF
}

stage_build() {
  local rc
  echo "== build: pip install -e . (offline: --no-index, --no-build-isolation, --no-deps)," \
    "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  PIP_DISABLE_PIP_VERSION_CHECK=1 run_or_stand_in build "$GC_PY" -m pip install --no-index --no-build-isolation --no-deps -e .
  rc=$?
  if [ "$rc" = 0 ]; then
    note "pip install -e . worked offline"
  else
    note "pip install -e . failed (exit $rc): the CUDA module is built on first use below"
  fi
  [ "$GC_DRY" = 1 ] && return "$rc"
  echo "== first use: native.load_ops('cuda') (builds it there unless prebuilt)"
  SNGM_VERBOSE_BUILD=1 "$GC_PY" - <<'EOF'
import sys, time
import torch
import sngm_ext
from sngm_ext import native
t0 = time.perf_counter()
try:
    native.load_ops("cuda")
except Exception as e:
    print(f"kit-note: the CUDA module does not load: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(e)
    sys.exit(1)
dt = time.perf_counter() - t0
try:
    native.load_ops("cpu")
except Exception as e:
    print(f"(the CPU module does not load: {e})")
info = native.info()
print(f"sngm_ext native: {info}")
cuda = info.get("cuda", {})
print(f"kit-note: CUDA module {cuda.get('how')} ({dt:.1f} s): {cuda.get('path')}")
cpu = info.get("cpu")
if isinstance(cpu, dict):
    print(f"kit-note: CPU module {cpu.get('how')}: {cpu.get('path')}")
EOF
}

stage_gpu_tests() {
  local xml="$GC_OUT/gpu_tests.junit.xml" rc jrc
  rm -f "$xml"
  run_or_stand_in gpu_tests env -u TRITON_INTERPRET "$GC_PY" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py -m "gpu and not gpu_extra" -rA --junitxml="$xml"
  rc=$?
  echo "== pytest exit status $rc"
  case $rc in 0 | 1 | 5) ;; *) note "pytest exit status $rc (2: interrupted, 3: internal error, 4: usage error)" ;; esac
  junit_notes "$xml" require_one
  jrc=$?
  [ "$rc" = 0 ] && [ "$jrc" != 0 ] && rc=1
  return "$rc"
}

stage_extra() {
  local xml="$GC_OUT/extra.junit.xml" rc f files=(tests/test_gpu.py)
  rm -f "$xml"
  for f in tests/test_gpu_extra*.py; do [ -f "$f" ] && files+=("$f"); done
  run_or_stand_in extra env -u TRITON_INTERPRET "$GC_PY" -m pytest -q -p no:cacheprovider \
    "${files[@]}" -m gpu_extra -rA --junitxml="$xml"
  rc=$?
  echo "== pytest exit status $rc"
  case $rc in 0 | 1 | 5) ;; *) note "pytest exit status $rc (2: interrupted, 3: internal error, 4: usage error)" ;; esac
  if [ "$rc" = 5 ]; then
    note "no gpu_extra tests collected (counted as ok)"
    return 0
  fi
  junit_notes "$xml" require_one || { [ "$rc" = 0 ] && rc=1; }  # collected, none ran: failed
  return "$rc"
}

# bench_budget_s: the stage limit less GPU_CHECK_BENCH_MARGIN_S (the process's start and end);
# half the limit where that would leave less than half.
bench_budget_s() {
  local margin lim=$GC_LIMIT_MS
  margin=$(to_ms GPU_CHECK_BENCH_MARGIN_S "${GPU_CHECK_BENCH_MARGIN_S:-15}")
  if [ $((lim - margin)) -lt $((lim / 2)) ]; then secs $((lim / 2)); else secs $((lim - margin)); fi
}

stage_bench_dir() {  # stage_bench_dir DIR [--full]
  local dir=$1 rc
  shift
  rm -f "$dir"/latest_gpu.json "$dir"/latest_gpu.md "$dir"/latest_gpu.png
  run_or_stand_in "$STAGE" "$GC_PY" benchmarks/bench_step.py --device cuda "$@" \
    --budget-s "$(bench_budget_s)" --out "$dir"
  rc=$?
  echo "== bench_step.py exit status $rc"
  [ "$rc" = 0 ] || note "bench_step.py exit status $rc"
  bench_notes "$dir" || { [ "$rc" = 0 ] && rc=1; }  # a run that measured nothing is a failure
  return "$rc"
}

stage_bench() { stage_bench_dir "$GC_OUT/bench" --phases; }  # the ops alone too: cheap on a GPU
stage_full() { stage_bench_dir "$GC_OUT/bench_full" --full; }

# ---------------------------------------------------------------------------------------- driver

status_line() {  # status_line STAGE STATUS MS LOG NOTE
  local n=${5//$'\t'/ }
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$(secs1 "$3")" "$4" "${n:0:200}" >>"$OUT/status.tsv"
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

# run_stage STAGE CAP_MS MIN_MS
run_stage() {
  local stage=$1 cap=$2 min=$3 log left limit t0 t1 rc status note
  log=$(log_name "$stage")
  left=$((BUDGET_MS - RESERVE_MS - ($(now_ms) - T0)))
  if [ "$INTERRUPTED" = 1 ]; then
    status=skipped note="interrupted"
  elif [ -n "${GPU_CHECK_STAGES:-}" ] && ! in_list "$stage" "$GPU_CHECK_STAGES"; then
    status=skipped note="not in GPU_CHECK_STAGES"
  elif [ "$left" -lt "$min" ] || [ "$left" -le 0 ]; then
    status=skipped note="$(secs1 $((left > 0 ? left : 0))) s of the budget left (needs $(secs1 "$min") s)"
  else
    status=""
  fi
  if [ -n "$status" ]; then
    echo "kit-note: skipped: $note" >"$OUT/$log"
    status_line "$stage" skipped 0 "$log" "$note"
    printf '[gpu_check %6s s] %-9s skipped (%s)\n' "$(secs1 $(($(now_ms) - T0)))" "$stage" "$note"
    archive
    return
  fi
  limit=$((cap < left ? cap : left))
  printf '[gpu_check %6s s] %-9s started, limit %s s, log %s\n' "$(secs1 $(($(now_ms) - T0)))" \
    "$stage" "$(secs1 "$limit")" "$log"
  t0=$(now_ms)
  GC_LIMIT_MS=$limit STAGE=$stage timeout --kill-after="$KILL_AFTER_S" "$(secs "$limit")" \
    "${DEFAULT_PIPE[@]}" bash "$SELF" __stage "$stage" >"$OUT/$log" 2>&1 </dev/null &
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
    case $stage in  # what the benchmark wrote before it was stopped (it saves after every set)
      bench) partial=$(GC_PY=$PY bench_notes "$OUT/bench" 2>&1) ;;
      full) partial=$(GC_PY=$PY bench_notes "$OUT/bench_full" 2>&1) ;;
    esac
    if [ -n "$partial" ]; then
      echo "$partial" >>"$OUT/$log"
      note=$(echo "$partial" | grep -m1 '^kit-note: ' | sed 's/^kit-note: //')
    fi
    note="timed out after $(secs1 "$limit") s${note:+; $note}"
  else
    status=failed
    [ -z "$note" ] && note="exit $rc"
  fi
  status_line "$stage" "$status" $((t1 - t0)) "$log" "$note"
  printf '[gpu_check %6s s] %-9s %s in %s s%s\n' "$(secs1 $((t1 - T0)))" "$stage" "$status" \
    "$(secs1 $((t1 - t0)))" "${note:+: ${note:0:120}}"
  archive
}

summary() {
  local stage status s log n
  {
    echo "== gpu_check summary$([ "$DRY" = 1 ] && echo ' (dry-run)'): $(secs1 $(($(now_ms) - T0))) s of a $(secs1 "$BUDGET_MS") s budget, in $OUT"
    if command -v column >/dev/null; then column -t -s $'\t' "$OUT/status.tsv"; else cat "$OUT/status.tsv"; fi
    echo "== key lines"
    while IFS=$'\t' read -r stage status s log n; do
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
  local a out_arg="" stage cap_var min
  DRY=0
  for a in "$@"; do
    case "$a" in
      --dry-run) DRY=1 ;;
      -h | --help) usage; exit 0 ;;
      -*) usage >&2; die "unknown option: $a" ;;
      *) [ -z "$out_arg" ] || die "one OUT_DIR only (got '$out_arg' and '$a')"; out_arg=$a ;;
    esac
  done
  [ -n "$out_arg" ] || { usage >&2; die "OUT_DIR is missing"; }

  # settings first: a bad one is a kit error before anything is written
  BUDGET_MS=$(to_ms GPU_CHECK_BUDGET_S "${GPU_CHECK_BUDGET_S:-450}") || exit 2
  RESERVE_MS=$(to_ms GPU_CHECK_RESERVE_S "${GPU_CHECK_RESERVE_S:-5}") || exit 2
  local min_ms full_min_ms
  min_ms=$(to_ms GPU_CHECK_MIN_STAGE_S "${GPU_CHECK_MIN_STAGE_S:-10}") || exit 2
  full_min_ms=$(to_ms GPU_CHECK_FULL_MIN_S "${GPU_CHECK_FULL_MIN_S:-45}") || exit 2
  to_ms GPU_CHECK_BENCH_MARGIN_S "${GPU_CHECK_BENCH_MARGIN_S:-15}" >/dev/null || exit 2
  KILL_AFTER_S=${GPU_CHECK_KILL_AFTER_S:-5}
  to_ms GPU_CHECK_KILL_AFTER_S "$KILL_AFTER_S" >/dev/null || exit 2
  declare -A CAPS=([env]=30 [build]=240 [gpu_tests]=150 [bench]=120 [extra]=90 [full]=600)
  for stage in "${STAGES[@]}"; do
    cap_var="GPU_CHECK_CAP_${stage^^}"
    CAPS[$stage]=$(to_ms "$cap_var" "${!cap_var:-${CAPS[$stage]}}") || exit 2
  done
  a=${GPU_CHECK_STAGES:-}
  for a in ${a//,/ }; do
    in_list "$a" "${STAGES[*]}" || die "GPU_CHECK_STAGES: unknown stage '$a' (stages: ${STAGES[*]})"
  done

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

  export GC_OUT=$OUT GC_PY=$PY GC_DRY=$DRY PYTHONUNBUFFERED=1
  # The H200 / H100 arch for every build, the kit's and a first use's alike (one cached build).
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  T0=$(now_ms)
  printf 'stage\tstatus\tseconds\tlog\tnote\n' >"$OUT/status.tsv" || die "cannot write $OUT/status.tsv"
  rm -f -- "$OUT/summary.txt"
  trap 'on_signal' INT TERM HUP
  # A closed stdout (`| head`) must not stop the kit (its record is in OUT_DIR); the stages get
  # SIGPIPE back where env can give it (GNU env --default-signal).
  DEFAULT_PIPE=()
  env --default-signal=PIPE true 2>/dev/null && DEFAULT_PIPE=(env --default-signal=PIPE)
  trap '' PIPE
  echo "[gpu_check] $(date -u +%Y-%m-%dT%H:%M:%SZ) budget $(secs1 "$BUDGET_MS") s, out $OUT, python $PY$([ "$DRY" = 1 ] && echo ', DRY RUN')"
  for stage in "${STAGES[@]}"; do
    min=$min_ms
    [ "$stage" = full ] && min=$full_min_ms
    run_stage "$stage" "${CAPS[$stage]}" "$min"
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
