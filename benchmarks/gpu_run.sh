#!/usr/bin/env bash
# Everything about torch_bn's CUDA build that needs a GPU, in one run of under 10 minutes on a
# machine with torch 2.11+ built for CUDA 13 (an H100 or H200):
#
#   bash benchmarks/gpu_run.sh                 # build tests sanitize bench
#   bash benchmarks/gpu_run.sh build sanitize  # some stages, in the order given
#
# build     installs torch_bn with its CUDA kernels (sm_90), failing if they are left out
# tests     the test suite, where every parity test also runs on "cuda"
# sanitize  compute-sanitizer memcheck, racecheck and initcheck over benchmarks/sanitizer_case.py
# bench     benchmarks/bench.py on CUDA (BENCH_ARGS replaces its arguments, default --device cuda)
#
# Each stage runs even when an earlier one failed (except after a failed build) and gets at most
# what is left of the 570-second budget (TIME_BUDGET). Results go to $OUT (the device tool's
# folder; benchmarks/results/gpu_run elsewhere): summary.txt, logs.tar.gz with one log per stage,
# and bench/ with bench.py's outputs. Exits 1 if any stage failed.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/benchmarks/results/gpu_run}
logs=$(mktemp -d)
mkdir -p "$out"
budget=${TIME_BUDGET:-570}
stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(build tests sanitize bench)
fi
summary=()
failed=0

# run NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS (and never past the budget),
# logging to NAME.log and recording the outcome.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    summary+=("$(printf '%-22s SKIPPED (time budget spent)' "$name")")
    failed=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS status
  echo "== $name (at most ${limit} s): $*"
  # The stages are shell functions: run them in a child bash that timeout can stop.
  timeout --kill-after=10 "$limit" bash -c "$*" >"$logs/$name.log" 2>&1
  status=$?
  local outcome=ok
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    outcome="TIMED OUT"
  elif [ "$status" -ne 0 ]; then
    outcome="FAILED (status $status)"
  fi
  summary+=("$(printf '%-22s %-20s %4d s' "$name" "$outcome" $((SECONDS - start)))")
  if [ "$outcome" != ok ]; then
    tail -n 40 "$logs/$name.log"
    failed=1
    return 1
  fi
  tail -n 5 "$logs/$name.log"
}

machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
}

build() {
  # TORCH_BN_CUDA=1: a build that silently left the CUDA kernels out would pass every stage on CPU.
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 TORCH_BN_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation . &&
    python3 -P -c "
import torch, torch_bn
ops = ['forward_train', 'forward_eval', 'backward', 'forward_train_act', 'forward_eval_act', 'backward_act',
       'update_running_stats']
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key('torch_bn::' + op, 'CUDA')]
print('torch_bn from', torch_bn.__file__, '; CUDA kernels missing:', missing or 'none')
raise SystemExit(1 if missing else 0)"
}

tests() {
  # -P keeps the repository root off sys.path, so that the installed torch_bn (with _C) is used.
  # -rA lists every test's outcome, so that a run cut short (crashed workers, the time limit)
  # still tells which tests passed.
  python3 -P -m pytest -q -rA -n 8 --import-mode=importlib tests
}

sanitize() {
  local tool status=0
  for tool in memcheck racecheck initcheck; do
    echo "-- compute-sanitizer --tool $tool"
    # One cudaMalloc per tensor, so that memcheck sees each tensor's own bounds; only torch_bn's
    # kernels are instrumented.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      --kernel-name kns=torch_bn python3 -P benchmarks/sanitizer_case.py || status=1
  done
  return $status
}

bench() {
  # shellcheck disable=SC2086  (BENCH_ARGS is a list of arguments)
  python3 benchmarks/bench.py ${BENCH_ARGS:---device cuda} --out "$out/bench"
}

export out
export -f machine build tests sanitize bench

for stage in "${stages[@]}"; do
  case $stage in
    build)
      run machine 30 machine
      run build 420 build || break
      ;;
    tests) run tests 200 tests ;;
    sanitize) run sanitize 200 sanitize ;;
    bench) run bench 600 bench ;;
    *)
      echo "gpu_run: unknown stage '$stage' (build, tests, sanitize, bench)" >&2
      exit 2
      ;;
  esac
done

tar -czf "$out/logs.tar.gz" -C "$logs" .
rm -rf "$logs"
{
  echo "gpu_run: $(date -u +%FT%TZ), ${SECONDS} s"
  printf '%s\n' "${summary[@]}"
} | tee "$out/summary.txt"
exit $failed
