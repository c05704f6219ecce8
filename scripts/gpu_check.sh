#!/usr/bin/env bash
# The GPU proof in one call (5-6 minutes on an H100, 2 of them compiling): build the ExLlamaV2
# extension, run the GPU tests against the CPU reference logits for each attention path (matmul, and
# sdpa with this package's causal fix), then benchmark a Llama-2-7B-shaped GPTQ checkpoint on each.
#
#   bash scripts/gpu_check.sh                results under $OUT (default /tmp/gpu-check)
#   PEAKED_STD=0 bash scripts/gpu_check.sh   skips the decode on the peaked twin (about 30 s)
#   DIAG=1 bash scripts/gpu_check.sh         also scripts/gpu_diag.py (where ExLlamaV2 and HF part)
#
# Missing Python packages may be carried as wheels in .whl/ (exllamav2, cog, coglet, structlog,
# hypothesis, sortedcontainers); the tiny GPTQ test models may be carried in .gptq-models/. Prepared on a
# CPU machine with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl exllamav2==0.3.2 cog==0.23.1 coglet==0.23.1 structlog \
#     hypothesis sortedcontainers
#   python scripts/make_test_model.py .gptq-models/g32 --gptq --group-size 32
#   python scripts/make_test_model.py .gptq-models/g64-act-order --gptq --group-size 64 --act-order
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
[ -d .gptq-models ] && export LLAMA_PKG_GPTQ_MODELS=$PWD/.gptq-models
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/exllamav2-ext} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
rm -f "$TORCH_EXTENSIONS_DIR"/*/exllamav2_ext/lock  # a build killed half-way leaves it and hangs the next
t=$(date +%s)
timeout 400 python3 -c "from llama_pkg.backends.exllamav2 import build_extension; print('extension in', build_extension())" 2>&1 | tail -3
echo "extension build: $(( $(date +%s) - t )) s"
[ "${DIAG:-0}" = 1 ] && timeout 120 python3 scripts/gpu_diag.py "$OUT/gpu-diag.json" 2>&1 | grep -v -i warn | tail -8
status=0
for mode in matmul sdpa; do
  echo "== GPU tests, attention: $mode"
  t=$(date +%s)
  LLAMA_PKG_EXL2_ATTENTION=$mode LLAMA_PKG_GPU_REPORT="$OUT/gpu-errors-$mode.jsonl" \
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 \
    | tee "$OUT/gpu-tests-$mode.log" | grep -E "passed|failed|FAILED|Error" | tail -12
  status=$(( status || PIPESTATUS[0] ))
  echo "($(( $(date +%s) - t )) s)"
done
for mode in matmul sdpa; do
  echo "== benchmark, attention: $mode"
  peaked=$([ $mode = matmul ] && echo "${PEAKED_STD:-6.0}" || echo 0)  # the sampler's cost does not depend on attention
  LLAMA_PKG_EXL2_ATTENTION=$mode timeout 200 python3 scripts/bench_gpu.py --out "$OUT/bench-gpu-$mode.json" \
    --peaked-logit-std $peaked 2>&1 | grep -v "Using seed" | tail -70
  status=$(( status || PIPESTATUS[0] ))
done
echo "gpu check exit $status"
exit $status
