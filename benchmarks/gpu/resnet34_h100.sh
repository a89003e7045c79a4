#!/usr/bin/env bash
# ResNet-34 on Imagenette at the paper's sizes (Sec. 4.3) on one H100-class GPU, under 10 minutes
# end to end: coarse (112) then fine (224) vs fine only, early stopping; then inference across
# resolution on the GPU. Needs the project installed (`pip install -e .`, or torch + torchvision +
# mlflow on PYTHONPATH) and the data: DATA=path/to/imagenet10 (train/ and val/ class folders),
# default $MSCNN_DATA_DIR/imagenet10 or shared/data/imagenet10 in the working tree.
#   bash benchmarks/gpu/resnet34_h100.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${DATA:-${MSCNN_DATA_DIR:+$MSCNN_DATA_DIR/imagenet10}}
DATA=${DATA:-shared/data/imagenet10}
OUT=${1:-benchmarks/results}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY - <<'PY'
import torch; assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print("torch", torch.__version__, torch.cuda.get_device_name(0))
PY
timeout 480 $PY benchmarks/resnet_imagenette.py --device cuda --fine 224 --coarse 112 \
    --max-epochs 30 --patience 5 --batch 128 --lr 2e-3 --data-dir "$DATA" --out "$OUT"
timeout 90 $PY benchmarks/inference_resolution.py --device cuda --batch 10000 --out "$OUT"
