#!/usr/bin/env bash
# GPU check (< 5 minutes on one H100 / H200): ViT-B/16 bfloat16 train step, cuDNN attention.
#
#   pip install -e . "jax[cuda12]"     # once, on a machine with an NVIDIA GPU
#   bash experiments/gpu_check.sh      # from the repository root
#
# Prints images/s and MFU of the mmjax ViT-B/16 train step at 224x224 (and of the
# stock-flax ViT of the same shape, timed in the same rounds), then checks them against
# the target: >= 2,500 images/s per H100/H200 (NVIDIA's JAX-Toolbox T5X ViT: ~1,460).
# MFU is against the GPU's dense bf16 peak (PEAK_TFLOPS; known for H100/H200/A100).
# Results: experiments/results/gpu_check.json (or $OUT/gpu_check.json when $OUT is set).
# Env: BATCH (default 256), STEPS (default 20), PEAK_TFLOPS, TARGET_IMAGES_PER_S.
set -euo pipefail
cd "$(dirname "$0")/.."

BATCH="${BATCH:-256}"
STEPS="${STEPS:-20}"
TARGET_IMAGES_PER_S="${TARGET_IMAGES_PER_S:-2500}"
OUT_DIR="${OUT:-experiments/results}"
mkdir -p "$OUT_DIR"

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
if [[ -z "${PEAK_TFLOPS:-}" ]]; then
  case "$GPU_NAME" in
    *H100*|*H200*|*GH200*) PEAK_TFLOPS=989 ;;   # dense bf16, SXM
    *A100*) PEAK_TFLOPS=312 ;;
    *) echo "Unknown GPU '$GPU_NAME': set PEAK_TFLOPS (dense bf16 TFLOP/s)." >&2; exit 2 ;;
  esac
fi
echo "GPU: $GPU_NAME  peak ${PEAK_TFLOPS} TFLOP/s bf16  batch ${BATCH}  steps ${STEPS}"

# 1. The backend mmjax picks for bf16 on GPU is cuDNN, and it agrees with the reference.
python - <<'EOF'
import jax, jax.numpy as jnp
from mmjax.nn import attention
assert jax.default_backend() == "gpu", f"no GPU visible to jax: {jax.devices()}"
chosen = attention.default_backend(dtype=jnp.bfloat16)
assert chosen == "cudnn", f"mmjax picks {chosen!r} for bf16 on GPU, expected 'cudnn'"
q, k, v = (jax.random.normal(jax.random.key(i), (4, 197, 12, 64), jnp.bfloat16) for i in range(3))
fast = attention.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32)
ref = attention.dot_product_attention(q, k, v, implementation="reference").astype(jnp.float32)
err = float(jnp.max(jnp.abs(fast - ref)))
assert err < 3e-2, f"cudnn vs reference max abs error {err}"
print(f"attention backend for bf16 on {jax.devices()[0].device_kind}: cudnn (max |err| {err:.2e})")
EOF

# 2. ViT-B/16 train steps: mmjax (implementation=None -> cuDNN) vs stock flax, bf16.
python experiments/benchmark.py --cases vit --vit-variants B/16 --dtype bfloat16 \
  --vit-batch "$BATCH" --image-size 224 --steps "$STEPS" --warmup 3 \
  --peak-tflops "$PEAK_TFLOPS" --json "$OUT_DIR/gpu_check.json"

# 3. Verdict.
python - "$OUT_DIR/gpu_check.json" "$TARGET_IMAGES_PER_S" <<'EOF'
import json, sys
records = json.load(open(sys.argv[1]))["records"]
target = float(sys.argv[2])
ours = next(r for r in records if r["name"].startswith("mmjax ViT"))
stock = next(r for r in records if r["name"].startswith("flax ViT"))
print(f"mmjax ViT-B/16 bf16: {ours['examples_per_s']:.0f} images/s, MFU {100 * ours['mfu']:.1f}%"
      f" (stock flax: {stock['examples_per_s']:.0f} images/s, MFU {100 * stock['mfu']:.1f}%)")
ok = ours["examples_per_s"] >= target
print(f"target >= {target:.0f} images/s per GPU: {'MET' if ok else 'NOT MET'}")
sys.exit(0 if ok else 1)
EOF
