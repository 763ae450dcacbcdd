#!/usr/bin/env bash
# GPU acceptance check (issues 12, 14 and 16): in one go, within about 9.5 minutes on one H100/H200
# (KeOps compilation included),
#   1. the CUDA tests (pytest -m gpu once tests carry that marker, else -k cuda);
#   2. idefender-gpu bench --device cuda on workloads a, b, d-full and a slice of c1
#      (128,117 x 4096, 100 classes, K=1: the ImageNet ratio of 1,281 samples per class),
#      then the detector workload imagenet-cpu (IDefender's streamed fit, thresholds and
#      scoring: 1,281,167 x 1024 synthetic states made on the device, 1000 classes, K=1),
#      each under a time limit;
#   3. benchmarks/runbook_timings.py --device cuda (issue 14: README's GPU runbook figures,
#      WRN training and features, VGG19 forward and attack step, JPEG decoding, the detector
#      fit at D = 4096; runbook_timings.json);
#   4. a short summary (also written to summary.md).
# JSON records, logs and the summary go to $OUT when it is set (the device tool's folder),
# else to a fresh results/gpu-check-<UTC time>/. Nothing is written to benchmarks/results/.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#   --dry-run   print what would run (and the Python it would use) and exit; installs and runs
#               nothing, needs no GPU.
#
# Python: .venv if present; else a python3 that already holds torch (a GPU image), into which
# only this project is installed (pip install --no-deps --no-build-isolation -e ., offline);
# else README's install in a new .venv (torch==2.14.1 torchvision==0.29.1, then -e ".[dev,keops]").
# Wheels in .whl/ are installed with --no-index into /tmp/gpu-check-site first: for a GPU image
# without KeOps or torchgmm, make them on a machine with an index (all pure Python, ~0.4 MB):
#   pip wheel --no-deps pykeops==2.3 keopscore==2.3 -w .whl
#   pip download --no-deps torchgmm==0.1.4 -d .whl     # needs pytorch-lightning, torchmetrics
# (.whl/ is git-ignored; the device tool carries it with carry=[".whl"]). On a machine without
# CUDA the script exits with status 3 and says so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

dry_run=0
out_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) shift; out_dir=${1:?--out needs a folder} ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$out_dir" ]; then
  out_dir=${OUT:-results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
fi

# Time limits, in seconds, of each step (shell timeout) and, in minutes, of one
# implementation's phase inside a workload (bench --limit-min). Sum of the steps: 570 s
# (imagenet-cpu's 60 s: 10 s from each earlier step and the 10 s that were left; the runbook
# timings' 90 s: ~72 s of step caps, Python start and CUDA set-up; the device tool allows 600 s).
T_TESTS=130; T_A=60; T_B=70; T_D=80; T_C1=80; T_IMAGENET=60; T_RUNBOOK=90
export PYTHONUNBUFFERED=1
failed=0

run() {  # run LIMIT_SECONDS LOG -- command...: the command under a time limit, output to LOG
  local limit=$1 log=$2; shift 3
  if [ "$dry_run" = 1 ]; then
    echo "[dry-run] timeout ${limit}s $(printf '%q ' "$@")>> $log"
    return 0
  fi
  echo "== $* (limit ${limit}s)"
  local start=$SECONDS status
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  status=$?
  if [ $status -eq 124 ] || [ $status -eq 137 ]; then
    echo "   TIMED OUT after $((SECONDS - start)) s (limit ${limit} s); see $log"
  else
    echo "   exit $status after $((SECONDS - start)) s"
  fi
  [ $status -eq 0 ] || failed=$((failed + 1))
  return $status
}

# --- Python ---------------------------------------------------------------------------
if [ -d .venv ]; then
  py_choice="the project's .venv"
  setup() { . .venv/bin/activate; }
elif python3 -c "import torch" >/dev/null 2>&1; then
  py_choice="$(command -v python3) (torch $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)); the project installed with --no-deps"
  setup() {
    python3 -c "import idefender_gpu.kernels" >/dev/null 2>&1 \
      || python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
  }
else
  py_choice="a new .venv with README's install command"
  setup() {
    python3 -m venv .venv && . .venv/bin/activate \
      && pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[dev,keops]"
  }
fi
wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu-check-site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

# -m gpu once tests carry the marker (pytest.ini declares it), else the CUDA parametrisations.
if grep -qE '^\s+gpu:' pytest.ini 2>/dev/null && grep -rqE 'mark\.gpu|add_marker\(.*gpu' tests/; then
  test_select=(-m gpu)
else
  test_select=(-k cuda)
fi
bench=(python3 -m idefender_gpu.cli bench --device cuda --out "$out_dir" --iters 5 --repeats 2)
steps_desc="CUDA tests (${test_select[*]}); bench a, b, d-full, c1 slice, imagenet-cpu; runbook timings"

if [ "$dry_run" = 1 ]; then
  echo "gpu_check --dry-run: Python: $py_choice; results: $out_dir; $steps_desc"
  [ -d .venv ] && . .venv/bin/activate  # activation only: nothing is installed in a dry run
  if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "CUDA is available here"
  else
    echo "no CUDA device here (a real run would stop with status 3)"
  fi
else
  setup || { echo "gpu_check: setting up Python failed ($py_choice)" >&2; exit 1; }
  wheels || { echo "gpu_check: installing the wheels in .whl/ failed" >&2; exit 1; }
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing to check." >&2
    echo "Run it on a machine with an NVIDIA GPU (e.g. through the device tool)." >&2
    exit 3
  fi
  mkdir -p "$out_dir"
  nvidia-smi -L 2>/dev/null | head -2
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import pykeops; print('pykeops', pykeops.__version__)" 2>/dev/null \
    || echo "pykeops not importable: the keops backend will be recorded as not installed"
fi

# --- 1. CUDA tests ----------------------------------------------------------------------
run $T_TESTS "$out_dir/pytest_cuda.log" -- python3 -m pytest -q -p no:cacheprovider "${test_select[@]}"

# --- 2. Workloads -----------------------------------------------------------------------
# a and b: every reference (torchgmm is recorded as skipped where it is not installed);
# d-full: both backends against the array-API reference; c1 slice: ours alone.
run $T_A "$out_dir/bench.log" -- "${bench[@]}" --workload a --limit-min 0.25
run $T_B "$out_dir/bench.log" -- "${bench[@]}" --workload b --limit-min 0.25
run $T_D "$out_dir/bench.log" -- "${bench[@]}" --workload d-full --references sklearn_array_api \
  --limit-min 0.3
run $T_C1 "$out_dir/bench.log" -- "${bench[@]}" --workload c1 --scale 0.1 --groups 100 \
  --references "" --limit-min 1 --max-iter 20
# imagenet-cpu: the detector's streamed fit on the device, sorted batches (one variant process)
run $T_IMAGENET "$out_dir/bench.log" -- "${bench[@]}" --workload imagenet-cpu --limit-min 0.8

# --- 3. Runbook timings (issue 14) ----------------------------------------------------------
# every per-step figure of README's GPU runbook; each step under its cap, the caps shrunk to
# what is left of --budget-s (85 s, imports included); the JSON is rewritten after each step
run $T_RUNBOOK "$out_dir/runbook.log" -- python3 benchmarks/runbook_timings.py --device cuda --budget-s 85 \
  --out "$out_dir/runbook_timings.json"

# --- 4. Summary -------------------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
  echo "[dry-run] summary of $out_dir/*.json -> $out_dir/summary.md"
  exit 0
fi
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ), $SECONDS s"
  echo
  echo "CUDA tests: $(grep -E '(passed|failed|error)' "$out_dir/pytest_cuda.log" | tail -1)"
  echo
  python3 -c "import sys; from idefender_gpu.bench.report import format_summary, load_records; print(format_summary(load_records(sys.argv[1])))" "$out_dir"
  echo
  python3 benchmarks/runbook_timings.py --summary "$out_dir/runbook_timings.json" 2>/dev/null \
    || echo "runbook timings: no record (see $out_dir/runbook.log)"
  echo
  echo "steps failed or timed out: $failed (logs: $out_dir/pytest_cuda.log, $out_dir/bench.log, $out_dir/runbook.log)"
} | tee "$out_dir/summary.md"
[ "$failed" -eq 0 ]
