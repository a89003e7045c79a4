#!/usr/bin/env bash
# Ray Train stages on the GPU machine, for real (issue 18): `mscnn train` with Ray Train
# (`scaling.use_gpu: auto` must pick the GPU) and MLflow tracking to a local file store (OUT_DIR/
# mlruns, packed as mlruns.tar.gz; MLflow's SQLite store needs three packages more than fit), then
# benchmarks/system_overhead.py --device cuda: the Ray stage against the plain GPU loop on the same
# level, alternating, 3 rounds, each path's GPU utilisation sampled. Two parts, one device call each
# (the data and the packages do not fit in one call's 64 MiB together):
#   mnist:  configs/mnist_multiscale.yaml (14 -> 28, all of MNIST) + the 28x28 ODENet level
#   resnet: configs/imagenet10_resnet.yaml (ResNet-34 112 -> 224, a few epochs) + its 224 level
# On the GPU machine (no Ray, MLflow or pydantic there, no registry): the packages travel as
# .whl/site.tar.xz (benchmarks/gpu/bundle.sh) and the data as .gpudata/{mnist,imagenet10} (copies of
# ../shared/data's), both carried by the device tool:
#   bash benchmarks/gpu/ray_stage.sh mnist|resnet "$OUT"
# DRY_RUN=1 runs the same commands on a CPU, tiny (the demo's data, 1 epoch, 1 round; the resnet
# part only resolves its schedule): tests/test_gpu_script.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
PART=${1:?usage: ray_stage.sh mnist|resnet [OUT_DIR]}
OUT=$(mkdir -p "${2:-benchmarks/results/gpu}" && cd "${2:-benchmarks/results/gpu}" && pwd)
exec > >(tee -a "$OUT/log_$PART.txt") 2>&1  # the log comes back even when the call is cut short
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BUNDLE=${BUNDLE:-.whl/site.tar.xz} SITE=${SITE:-/tmp/site}
if ! $PY -c "import ray" 2>/dev/null; then
    [ -f "$BUNDLE" ] || { echo "no Ray here and no $BUNDLE (benchmarks/gpu/bundle.sh)" >&2; exit 2; }
    [ -d "$SITE/ray" ] || { mkdir -p "$SITE" && tar -C "$SITE" -xJf "$BUNDLE"; }
    export PYTHONPATH=$SITE
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export MLFLOW_TRACKING_URI=file://$OUT/mlruns MLFLOW_ALLOW_FILE_STORE=true
if [ -d .gpudata ]; then  # the configs name ../shared/data (imagenet10) or find MNIST through this
    export MSCNN_DATA_DIR=$PWD/.gpudata
    [ -e ../shared/data ] || { mkdir -p ../shared && ln -s "$PWD/.gpudata" ../shared/data; }
fi
$PY - <<'PY'
import mlflow, pydantic, ray, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"ray {ray.__version__}, mlflow {mlflow.__version__}, pydantic {pydantic.__version__}, "
      f"torch {torch.__version__}, {gpu}", flush=True)
PY
if [ -n "${DRY_RUN:-}" ]; then
    DEV=cpu THREADS=2 EPOCHS=1 ROUNDS=1
    MNIST_TRAIN=(--config configs/demo_multiscale.yaml --set levels.0.epochs=1 levels.1.epochs=1)
    MNIST_LEVEL=()
else
    DEV=cuda THREADS=8 EPOCHS=3 ROUNDS=3
    MNIST_TRAIN=(--config configs/mnist_multiscale.yaml --set scaling.cpus_per_worker=8)
    MNIST_LEVEL=(--pyramid pyramid_mnist.yaml)
    if [ -n "${SHORT:-}" ]; then  # the demo's subset: a call with about 3 minutes to run in
        EPOCHS=2 MNIST_TRAIN=(--config configs/demo_multiscale.yaml --set scaling.cpus_per_worker=8) MNIST_LEVEL=()
    fi
    if command -v nvidia-smi >/dev/null; then  # not holding the caller's stdout/stderr (a pipe)
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 \
            > "$OUT/nvidia_smi_$PART.csv" 2>/dev/null < /dev/null &
        SMI=$!
        trap 'kill $SMI 2>/dev/null || true' EXIT
    fi
fi
t0=$(date +%s)
step() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
case $PART in
mnist)
    step "mscnn train ${MNIST_TRAIN[*]}"
    $PY -m pipelines.cli train --fresh "${MNIST_TRAIN[@]}"
    step "system_overhead.py"
    $PY benchmarks/system_overhead.py --device $DEV --threads $THREADS --epochs $EPOCHS \
        --repeats $ROUNDS --paths worker plain "${MNIST_LEVEL[@]}" --out "$OUT" || [ $? = 3 ]
    ;;
resnet)
    if [ -n "${DRY_RUN:-}" ]; then
        $PY -m pipelines.cli train --dry-run --config configs/imagenet10_resnet.yaml \
            --set levels.0.epochs=4 levels.1.epochs=4 scaling.cpus_per_worker=8 > "$OUT/resnet_schedule.yaml"
    else
        step "mscnn train configs/imagenet10_resnet.yaml"
        $PY -m pipelines.cli train --fresh --config configs/imagenet10_resnet.yaml \
            --set levels.0.epochs=4 levels.1.epochs=4 scaling.cpus_per_worker=8
        step "system_overhead.py --config imagenet10_resnet.yaml"
        $PY benchmarks/system_overhead.py --device cuda --threads 8 --epochs 4 --repeats 3 \
            --config imagenet10_resnet.yaml --n 224 --paths worker plain --out "$OUT" || [ $? = 3 ]
    fi
    ;;
*) echo "unknown part: $PART (mnist or resnet)" >&2; exit 2 ;;
esac
step "part $PART done"
if [ -d "$OUT/mlruns" ]; then  # runs, params, metrics, tags; no file over 2 MB (model weights stay)
    (cd "$OUT" && find mlruns -type f -size -2M | tar -czf mlruns.tar.gz -T - && rm -rf mlruns)
fi
ls -la "$OUT"
