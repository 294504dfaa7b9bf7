#!/usr/bin/env bash
# The prepared GPU run, under 8 minutes on one H100:
#   bash benchmarks/gpu.sh            (PY=/path/to/python to use another environment)
# 1. The ViT-B M2D training step in bfloat16, batch 256, 80 x 608, with random and with DWM
#    masking: step time, examples/s and MFU (XLA cost analysis / the device's bf16 peak).
# 2. The same DWM step with rematerialised blocks: the compiled memory analysis.
# 3. Compile time of that step with per-layer and with scanned blocks.
# 4. The sampler benchmark (every masker, B = 256).
# It needs an environment whose jax sees the GPU (jax[cuda12] installed beside the package);
# it stops at once, saying so, where jax sees none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
backend=$("$PY" -c 'import jax; print(jax.default_backend())')
if [ "$backend" != "gpu" ]; then
    echo "benchmarks/gpu.sh: jax's backend here is '$backend', not gpu (install jax[cuda12])" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for masker in random dispersion; do
    timeout 150 "$PY" benchmarks/train.py --objective m2d --masker "$masker" --batch 256 \
        --dtype bfloat16 --steps 20
done
timeout 120 "$PY" benchmarks/train.py --objective m2d --masker dispersion --batch 256 \
    --dtype bfloat16 --steps 5 --remat full
for scan in "" --scan; do
    timeout 90 "$PY" benchmarks/train.py --objective m2d --batch 256 --compile_only $scan
done
timeout 120 "$PY" benchmarks/masking.py --batch 256 --reps 30 --numpy-reps 2
