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
# The #[ignore]d tests are the GPU instances of every kernel property (tests/backends.rs, tests/cs336.rs,
# the vocabulary-parallel kernels in tests/vocab_parallel.rs) and the CUDA-only API (tests/cuda.rs).
# NCCL for the NCCL group's test (tests/vocab_parallel.rs): the nvidia-nccl-cu12 wheel PyTorch brings
# has only libnccl.so.2, and cudarc loads libnccl.so: a link to it, on the loader's path.
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
if [ -n "$nccl_lib" ] && [ -f "$nccl_lib/libnccl.so.2" ]; then
    nccl_link=$(mktemp -d)
    ln -s "$nccl_lib/libnccl.so.2" "$nccl_link/libnccl.so"
    export LD_LIBRARY_PATH="$nccl_link${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# cuBLAS for the fused linear cross-entropy (tests/linear_ce.rs, the linear_ce bench): cudarc loads
# libcublas.so (or .so.12), which PyTorch's NVIDIA wheels ship outside the loader's path (nvidia/cublas/lib
# for CUDA 12, nvidia/cu13/lib for CUDA 13, whose libcublas.so.13 keeps the cublasGemmEx this calls): the
# first one found, linked as libcublas.so, with its directory (libcublasLt beside it) on the path.
cublas_so=$(python3 -c '
import glob, os, nvidia
hits = [h for base in nvidia.__path__ for h in sorted(glob.glob(os.path.join(base, "**", "libcublas.so.*"), recursive=True))]
print(hits[0] if hits else "")' 2>/dev/null || true)
if [ -n "$cublas_so" ]; then
    echo "cuBLAS: $cublas_so"
    cublas_link=$(mktemp -d)
    ln -s "$cublas_so" "$cublas_link/libcublas.so"
    export LD_LIBRARY_PATH="$cublas_link:$(dirname "$cublas_so")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
for t in backends cuda cs336 vocab_parallel linear_ce; do
    step "gpu-tests-$t" "$bin_dir/$t" --ignored --test-threads=1
done
if command -v compute-sanitizer >/dev/null; then
    for t in backends cuda vocab_parallel linear_ce; do
        step "sanitizer-memcheck-$t" compute-sanitizer --tool memcheck --error-exitcode 1 \
            "$bin_dir/$t" --ignored --test-threads=1
    done
    step sanitizer-initcheck compute-sanitizer --tool initcheck --error-exitcode 1 \
        "$bin_dir/backends" --ignored --test-threads=1 on_cuda::wide_rows_and_many_rows
else
    summary+=("SKIP  compute-sanitizer (not installed)")
fi
# The Python package's tests (its GPU tests run here) from the wheel build-gpu-bins.sh made: installed
# into a scratch directory beside the machine's own PyTorch.
if ls "$bin_dir"/wheel/*.whl >/dev/null 2>&1; then
    py_site="$log_dir/py-site"
    python3 -m pip install -q --no-deps --no-index --target "$py_site" "$bin_dir"/wheel/*.whl
    step python-tests env PYTHONPATH="$py_site" python3 -m pytest -q -rs -p no:cacheprovider "$bin_dir/python-tests"
    if [ -f "${SFT_COLLATE_SHARED:-../shared}/fixtures/gsm8k/train.jsonl" ]; then
        step python-bench env PYTHONPATH="$py_site" python3 bindings/python/bench/tokenize_gsm8k.py --runs 3 --device cuda
    fi
fi
bench_secs="${GPU_CHECK_BENCH_SECS:-3}"
step cuda-benches "$bin_dir/collate" --bench cuda_ --warm-up-time 1 --measurement-time "$bench_secs"
step bench-loss-bf16 "$bin_dir/sft-collate" bench loss --rows 16384 --vocab 151936 --dtype bf16 --masked 0.5
step masked-ce-benches "$bin_dir/masked_ce" --bench --warm-up-time 1 --measurement-time "$bench_secs"
# One launch of each hot kernel under Nsight Compute: duration and DRAM throughput as the hardware counts
# them (criterion's times include the host side of a launch). Needs counter permissions; a refusal is
# reported as a failed step and changes nothing else.
if command -v ncu >/dev/null; then
    step ncu-masked-ce ncu --kernel-name regex:masked_ce_fwd_bf16 --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight "$bin_dir/sft-collate" bench loss --rows 16384 --vocab 151936 --dtype bf16 --masked 0.5
    step ncu-collate ncu --kernel-name regex:collate_i32 --launch-skip 20 --launch-count 1 --section SpeedOfLight \
        "$bin_dir/collate" --bench cuda_collate/256x8192/cuda_kernel --warm-up-time 0.1 --measurement-time 0.1
fi
# The CPU side on this machine's cores: tokenizer engines and the end-to-end CLI (with the fixtures only).
shared="${SFT_COLLATE_SHARED:-../shared}"
if [ -f "$shared/fixtures/gsm8k/train.jsonl" ] && [ -x "$bin_dir/tokenize" ]; then
    step tokenize-benches "$bin_dir/tokenize" --bench --warm-up-time 1 --measurement-time "$bench_secs"
    f="$shared/fixtures"
    for engine in fast tokenizers; do
        step "cli-gsm8k-$engine" "$bin_dir/sft-collate" collate --input "$f/gsm8k/train.jsonl" \
            --tokenizer "$f/qwen2/tokenizer.json" --template "$f/gsm8k/r1_zero.prompt" --output-key answer \
            --tokenizer-engine "$engine" --output "$log_dir/out-$engine"
        rm -rf "$log_dir/out-$engine"
    done
fi

echo
echo "== gpu-check report =="
for line in "${summary[@]}"; do echo "$line"; done
for log in cuda-benches masked-ce-benches tokenize-benches; do
    grep -hE "^(cuda_collate|masked_ce|tokenize)/|time:|thrpt:" "$log_dir/$log.log" 2>/dev/null | paste - - - 2>/dev/null | sed 's/  */ /g'
done
grep -hE "Duration|DRAM Throughput|Memory Throughput" "$log_dir"/ncu-*.log 2>/dev/null
grep -h "wrote" "$log_dir"/cli-gsm8k-*.log 2>/dev/null
cat "$log_dir/bench-loss-bf16.log" 2>/dev/null
exit $failed
