#!/usr/bin/env bash
# The GPU check (issue: multi-device and mixed precision). On a machine with a CUDA GPU, in under 7 minutes:
#   1. the tests marked `gpu` (CUDA hypergradients vs CPU, float16/bfloat16 autocast vs float32, a fit under
#      each precision, a float16 overflow skipped);
#   2. a short CIFAR-10-LT search with ResNet-32 under 16-mixed, bf16-mixed and 32-true (benchmarks/gpu_search.py;
#      the JPEG copy when a tarball is given, else random CIFAR-shaped data);
#   3. the speed benchmark on the GPU (benchmarks/speed.py --device cuda).
# Figures go to OUT_DIR (default: $OUT when set, else ./gpu_check_out).
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR] [CIFAR10_JPEG_TARBALL]
# The package is used from this source tree (PYTHONPATH); torch, pytorch_lightning, torchmetrics, torchvision,
# scikit-learn, pyyaml, rich and pytest must be installed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_check_out}}
tarball=${2:-}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pytorch_lightning', pl.__version__)"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"

echo "== 1. tests marked gpu"
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_precision.py 2>&1 | tee "$out/pytest_gpu.txt" | tail -5 || status=1

echo "== 2. short CIFAR-10-LT search under each precision"
data_args=()
if [ -n "$tarball" ] && [ -f "$tarball" ]; then
  mkdir -p /tmp/cifar10-jpeg && tar xzf "$tarball" -C /tmp/cifar10-jpeg && data_args=(--data /tmp/cifar10-jpeg)
fi
timeout 150 python3 benchmarks/gpu_search.py "${data_args[@]}" --epochs 2 --out "$out/gpu_search.md" 2>&1 \
  | grep -v -i warn | tail -8 || status=1

echo "== 3. speed benchmark on the GPU"
timeout 150 python3 benchmarks/speed.py --device cuda --repeats 5 --epoch-repeats 2 --epoch-steps 40 --out "$out/speed_gpu.md" 2>&1 \
  | grep -v -i warn || status=1
exit $status
