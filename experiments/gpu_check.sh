#!/usr/bin/env bash
# GPU check (< 10 minutes on one H100 / H200): cuDNN attention and the GPU default's
# fallback, ViT-B/16 bfloat16 train step speed, per-GPU memory of the paper configs.
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

# 1b. The default never fails where jax.nn's XLA attention works: requests cuDNN refuses
# (float32, head_dim 256, odd lengths, masks, biases) fall back to "xla", still exact.
python - <<'EOF'
import jax, jax.numpy as jnp
from mmjax.nn import attention
cases = {  # name: (dtype, B, T, S, H, K, D, mask?, bias?, causal)
    "bf16 full": (jnp.bfloat16, 2, 256, 256, 8, 8, 64, False, False, False),
    "bf16 causal": (jnp.bfloat16, 2, 256, 256, 8, 8, 64, False, False, True),
    "bf16 GQA": (jnp.bfloat16, 2, 256, 256, 8, 2, 64, False, False, False),
    "bf16 padding mask": (jnp.bfloat16, 2, 77, 77, 8, 8, 64, True, False, False),
    "bf16 bias": (jnp.bfloat16, 2, 100, 100, 8, 8, 64, False, True, False),
    "bf16 head_dim 256": (jnp.bfloat16, 2, 128, 128, 4, 4, 256, False, False, False),
    "f32": (jnp.float32, 2, 197, 197, 12, 12, 64, False, False, False),
    "bf16 cross 1 query": (jnp.bfloat16, 2, 1, 300, 8, 8, 64, False, False, False),
}
for name, (dt, b, t, s, h, k, d, use_mask, use_bias, causal) in cases.items():
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), dt)
  kk, vv = (jax.random.normal(x, (b, s, k, d), dt) for x in keys[1:3])
  mask = (jnp.arange(s) < s - 5)[None, None, None, :] if use_mask else None
  bias = jax.random.normal(keys[3], (1, h, t, s), jnp.float32) if use_bias else None
  f = lambda impl: jax.jit(lambda q, kk, vv: attention.dot_product_attention(
      q, kk, vv, mask=mask, bias=bias, is_causal=causal, implementation=impl))(q, kk, vv)
  err = float(jnp.max(jnp.abs(f(None).astype(jnp.float32) - f("reference").astype(jnp.float32))))
  assert err < 5e-2, f"{name}: default vs reference max abs error {err}"
  chosen = attention.default_backend(dtype=dt, has_mask=use_mask, has_bias=use_bias,
                                     q_length=t, kv_length=s, head_dim=d)
  print(f"default attention, {name}: {chosen} (max |err| {err:.1e})")
EOF

# 2. ViT-B/16 train steps: mmjax (implementation=None -> cuDNN) vs stock flax, bf16.
python experiments/benchmark.py --cases vit --vit-variants B/16 --dtype bfloat16 \
  --vit-batch "$BATCH" --image-size 224 --steps "$STEPS" --warmup 3 \
  --peak-tflops "$PEAK_TFLOPS" --json "$OUT_DIR/gpu_check.json"

# 3. Per-GPU memory of the paper configs' real train steps (bf16), compiled for this GPU
# by the tool that compiles for TPU topologies (`--topology local`).
for spec in "vit_b16_imagenet.py 256" "siglip_b16.py 256" "clip_b16.py 256" \
            "mbt_audiovisual.py 8"; do
  set -- $spec
  python -m mmjax.aot --config "configs/$1" --topology local --config.model.dtype=bfloat16 \
    --config.batch_size="$2" --config.eval_batch_size="$2" \
    --json "$OUT_DIR/gpu_memory_${1%.py}.json" || true
done

# 4. Verdict.
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
