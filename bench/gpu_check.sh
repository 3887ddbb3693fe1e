#!/usr/bin/env bash
# The one prepared GPU check (at most 8 minutes on one H200), run from the repository root on a GPU
# machine; exits non-zero on any failure. Results go to $OUT (default runs/gpu).
#   1. the CUDA paths against the float64 CPU reference (tests/test_gpu.py): the TUCKER backend's
#      dispatch (Triton decode + prefill) on mixed batches with bf16, fp16 and fp8 (e4m3, e5m2)
#      caches, shared latents, the reference model's attention (flash-attention or SDPA), and
#      conversion's calibration and measured widths, perplexity and teacher forcing, and converting and
#      healing a tiny bfloat16 checkpoint (float32 and bf16 autocast) on CUDA against the CPU;
#   2. the Triton kernel's error limit and its decode bandwidth as a fraction of the device's
#      measured copy bandwidth (bench/gpu_decode.py, which fails above --max-rel-error);
#   3. where vLLM is installed (pip install "tucker-serve[gpu]"), the vLLM parity tests of the
#      TUCKER backend against the reference on prefill and decode, fp8 included, on CUDA;
#   4. there too, decode tokens/s of the default 1.2x conversion against its source under vLLM
#      (random SmolLM2-shape weights, bf16, compiled with CUDA graphs, batches 8 and 32 at 1,024
#      and 4,096 tokens; bench/gpu_serve_speed.py, at most 4 minutes);
#   5. there too, a tiny bfloat16 checkpoint converted at 2x and healed for 4 steps on CUDA, served by
#      `tucker-serve serve` with no sizes given, gets the GPU's defaults (the checkpoint's bf16, a cache
#      sized by --gpu-memory-utilization, the model's context) and answers (bench/gpu_serve_defaults.py).
set -euo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/plugins:$PWD/server:$PWD/bench:$PWD/cli${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), torch.__version__)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
"$PY" bench/gpu_decode.py --out "$OUT/gpu_decode.json" --batches 32,128 --contexts 4096,32768 --max-rel-error 1e-2
if "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_vllm_tiny.py tests/test_vllm_fp8.py tests/test_vllm_shared_latent.py \
        2>&1 | tee "$OUT/test_vllm.log"
    timeout 240 "$PY" bench/gpu_serve_speed.py --out "$OUT/serve_speed.json" --cache-dtypes auto 2>&1 \
        | tee "$OUT/serve_speed.log"
    timeout 120 "$PY" bench/gpu_serve_defaults.py --out "$OUT/serve_defaults.json" 2>&1 | tee "$OUT/serve_defaults.log"
else
    echo "gpu_check: vLLM is not installed here: the vLLM parity tests were NOT run" | tee "$OUT/vllm-not-run.txt"
fi
echo "gpu_check: passed"
