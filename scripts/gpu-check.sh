#!/usr/bin/env bash
# Everything that needs a CUDA device, in one go, with a short report at the end: what a CUDA-enabled CI
# runner calls.
#
#   scripts/gpu-check.sh            build with cargo, then run
#   scripts/gpu-check.sh gpu-bin    run prebuilt binaries (scripts/build-gpu-bins.sh) on a machine without Rust
#
# Runs: device report and kernel self-checks (sft-collate doctor), the #[ignore]d GPU tests, the same tests
# under compute-sanitizer memcheck and initcheck when it is installed, the cuda_ collate benches,
# `sft-collate bench loss` and the masked_ce benches. Exits non-zero if any
# step failed.
#
# For a machine lent by the minute: GPU_CHECK_STEP_TIMEOUT=S stops any one step after S seconds (reported
# as FAIL, exit 124), GPU_CHECK_BENCH_SECS=S sets criterion's measurement time, GPU_CHECK_LOGS=DIR puts
# the logs elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."
bin_dir="${1:-}"
if [ -z "$bin_dir" ]; then
    scripts/build-gpu-bins.sh >/dev/null
    bin_dir=gpu-bin
fi
log_dir="${GPU_CHECK_LOGS:-$bin_dir/logs}"
mkdir -p "$log_dir"
declare -a summary
failed=0
step() {
    local name="$1"
    shift
    local start end status
    start=$(date +%s)
    if [ -n "${GPU_CHECK_STEP_TIMEOUT:-}" ]; then
        timeout --kill-after=10 "$GPU_CHECK_STEP_TIMEOUT" "$@" >"$log_dir/$name.log" 2>&1
    else
        "$@" >"$log_dir/$name.log" 2>&1
    fi
    status=$?
    end=$(date +%s)
    if [ $status -eq 0 ]; then
        summary+=("PASS  $name ($((end - start)) s)")
    else
        summary+=("FAIL  $name ($((end - start)) s, exit $status): see $log_dir/$name.log")
        failed=1
    fi
    tail -n 30 "$log_dir/$name.log"
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no CUDA device here (nvidia-smi finds none); nothing to check" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step doctor "$bin_dir/sft-collate" doctor
step gpu-tests "$bin_dir/gpu" --ignored --test-threads=1
if command -v compute-sanitizer >/dev/null; then
    step sanitizer-memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$bin_dir/gpu" --ignored --test-threads=1
    step sanitizer-initcheck compute-sanitizer --tool initcheck --error-exitcode 1 \
        "$bin_dir/gpu" --ignored --test-threads=1 cuda_large_batch_and_edges
else
    summary+=("SKIP  compute-sanitizer (not installed)")
fi
bench_secs="${GPU_CHECK_BENCH_SECS:-3}"
step cuda-benches "$bin_dir/collate" --bench cuda_ --warm-up-time 1 --measurement-time "$bench_secs"
step bench-loss-bf16 "$bin_dir/sft-collate" bench loss --rows 16384 --vocab 151936 --dtype bf16 --masked 0.5
step masked-ce-benches "$bin_dir/masked_ce" --bench --warm-up-time 1 --measurement-time "$bench_secs"

echo
echo "== gpu-check report =="
for line in "${summary[@]}"; do echo "$line"; done
for log in cuda-benches masked-ce-benches; do
    grep -hE "^(cuda_collate|masked_ce)/|time:|thrpt:" "$log_dir/$log.log" 2>/dev/null | paste - - - 2>/dev/null | sed 's/  */ /g'
done
cat "$log_dir/bench-loss-bf16.log" 2>/dev/null
exit $failed
