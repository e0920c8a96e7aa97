#!/usr/bin/env bash
# GPU checks in one prepared script, for a machine with an NVIDIA GPU. It fetches nothing; it runs:
#   1. a probe: torch sees CUDA (else it stops here with exit 2 and says why);
#   2. FAISS on the GPU, each in its own process because a missing kernel aborts the process:
#      a GpuIndexFlatIP search checked against the CPU, then the same after a torch CUDA matmul in that
#      process (torch and faiss-gpu may bring different CUDA runtimes; docs/deploy.md);
#   3. the gpu-marked tests: pytest -m gpu;
#   4. bench/search.py and bench/ingest.py when present, with --device cuda where they take it;
#   5. bench/scale.py at GPU_CHECK_SCALE_N segments (default 1M): Flat and IVF-PQ on the GPU, then the CPU;
# and prints one table (step, result, seconds, detail). Logs: $OUT or /tmp/gpu_check, one file a step.
#
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_WHEELS, a folder of wheels to
# install offline first (pip --no-index into /tmp/gpu_check_site, for a machine that lacks the project's
# dependencies); GPU_CHECK_STEP_TIMEOUT seconds per step (default 240; GPU_CHECK_SCALE_TIMEOUT for step 5, 420).
# Exit: 0 every step that ran passed, 1 something failed, 2 no CUDA device here.
set -uo pipefail
cd "$(dirname "$0")/.."

LOGS="${OUT:-/tmp/gpu_check}"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-240}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi

if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    echo "installing the wheels in $GPU_CHECK_WHEELS (offline) into /tmp/gpu_check_site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$GPU_CHECK_WHEELS"/*.whl >"$LOGS/wheels.log" 2>&1 \
        || { echo "wheel install failed: see $LOGS/wheels.log" >&2; exit 1; }
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's packages, installed or not

rows=()
failed=0
record() {  # step, result, seconds, detail
    rows+=("$(printf '| %-22s | %-6s | %7s | %s |' "$1" "$2" "$3" "$4")")
    if [ "$2" = "FAIL" ]; then failed=1; fi
}
last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c1-110; }

# step NAME SKIP_RC SKIP_TEXT COMMAND...: run it with a timeout into $LOGS/NAME.log and record the result;
# exit code SKIP_RC (0: none) means "nothing to check here" and records SKIP with SKIP_TEXT (or the last line).
step() {
    local name=$1 skip_rc=$2 skip_text=$3 log="$LOGS/$1.log" start rc seconds
    shift 3
    echo "== $name: $*"
    start=$(date +%s)
    timeout "$STEP_TIMEOUT" "$@" >"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - start))
    cat "$log"
    if [ "$rc" -eq 0 ]; then
        record "$name" PASS "$seconds" "$(last_line "$log")"
    elif [ "$skip_rc" -ne 0 ] && [ "$rc" -eq "$skip_rc" ]; then
        record "$name" SKIP "$seconds" "${skip_text:-$(last_line "$log")}"
    elif [ "$rc" -eq 124 ]; then
        record "$name" FAIL "$seconds" "timed out after ${STEP_TIMEOUT}s"
    else
        record "$name" FAIL "$seconds" "exit $rc: $(last_line "$log")"
    fi
}

# 1. Is there a GPU that torch can use?
probe=$("$py" -c "
import torch
if not torch.cuda.is_available():
    print(f'no CUDA device visible to torch {torch.__version__} (built for CUDA {torch.version.cuda})')
    raise SystemExit(2)
p = torch.cuda.get_device_properties(0)
print(f'{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')
" 2>&1)
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "gpu_check: nothing to check on this machine: ${probe:-python failed} (python: $py)" >&2
    [ "$rc" -eq 2 ] && exit 2
    exit 1
fi
echo "gpu_check: $probe"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
record "cuda-probe" PASS 0 "$probe"

# 2. FAISS on the GPU (skipped, not failed, when this faiss has no GPU support).
faiss_gpu_code='
import sys, numpy as np, faiss
if not hasattr(faiss, "StandardGpuResources"):
    print(f"faiss {faiss.__version__} has no GPU support (faiss-cpu installed?)"); sys.exit(3)
if sys.argv[1] == "with-torch":
    import torch
    a = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize(); float((a @ a).sum())
rng = np.random.default_rng(0)
xb = rng.standard_normal((20000, 512), dtype=np.float32); faiss.normalize_L2(xb)
xq = xb[:64] + 0.05 * rng.standard_normal((64, 512), dtype=np.float32); faiss.normalize_L2(xq)
cpu = faiss.IndexFlatIP(512); cpu.add(xb)
res = faiss.StandardGpuResources()
gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
_, ic = cpu.search(xq, 10); _, ig = gpu.search(xq, 10)
agree = float((ic == ig).mean())
print(f"faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s): GpuIndexFlatIP top-10 agrees with CPU on {agree:.1%}")
sys.exit(0 if agree > 0.99 else 1)
'
for mode in alone with-torch; do
    step "faiss-gpu-$mode" 3 "" "$py" -c "$faiss_gpu_code" "$mode"
done

# 3. The gpu-marked tests (pytest exits 5 when none is collected).
step pytest-gpu 5 "no test is marked gpu" "$py" -m pytest -m gpu -q -p no:cacheprovider tests

# 4. Benchmarks, when present.
for bench in search ingest; do
    script="bench/$bench.py"
    if [ ! -f "$script" ]; then
        record "bench-$bench" SKIP 0 "$script not present"
        continue
    fi
    if "$py" "$script" --help 2>/dev/null | grep -q -- "--device"; then
        step "bench-$bench" 0 "" "$py" "$script" --device cuda
    else
        echo "($script takes no --device: it runs on its default device, CUDA when torch sees one)"
        step "bench-$bench" 0 "" "$py" "$script"
    fi
done

# 5. The broad view at library scale, on the GPU and then the CPU over the same vectors (bench/scale.py):
#    one-query search p50/p99, recall@10 against exact search, and searches during live adds.
scale_n="${GPU_CHECK_SCALE_N:-1000000}"
scale_args=(--sizes "$scale_n" --kinds flat,ivfpq --queries 500 --flat-queries 200 --nprobe 16 --rerank 100
    --apply-batches 3 --work-dir /tmp/gpu_check_scale --out "$LOGS/scale.json")
for device in cuda cpu; do
    STEP_TIMEOUT="${GPU_CHECK_SCALE_TIMEOUT:-420}" step "bench-scale-$device" 0 "" \
        "$py" -m bench.scale --index-device "$device" "${scale_args[@]}"
done

echo
echo "| step                   | result | seconds | detail |"
echo "|------------------------|--------|---------|--------|"
printf '%s\n' "${rows[@]}"
echo "logs: $LOGS"
exit "$failed"
