#!/usr/bin/env bash
# Packs what the GPU machine lacks for a Ray Train stage with MLflow (benchmarks/gpu/wheels.txt)
# into one archive that travels with the working tree (the device tool carries at most 64 MiB a
# call): the wheels unpacked side by side, Ray without what Python never loads there (ray/jars:
# Java; rllib, serve, llm; the dashboard's web client: the image lacks the dashboard's
# dependencies, so Ray starts without it) and its three native binaries stripped of their symbol
# tables (the dynamic symbols stay). On the GPU machine: tar xJf .whl/site.tar.xz -C /tmp/site and
# PYTHONPATH=/tmp/site (ray_stage.sh does it).
#   bash benchmarks/gpu/bundle.sh [PYVER=3.12] [OUT=.whl/site.tar.xz]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${1:-3.12}
OUT=${2:-.whl/site.tar.xz}
mkdir -p "$(dirname "$OUT")"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    plat+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${plat[@]}" -d "$stage/wheels" -r benchmarks/gpu/wheels.txt
for w in "$stage"/wheels/*.whl; do unzip -q -o "$w" -d "$stage/site"; done
rm -rf "$stage"/site/ray/{jars,rllib,serve,llm} "$stage"/site/ray/dashboard/client
find "$stage/site" -name tests -type d -prune -exec rm -rf {} +
find "$stage/site" -name __pycache__ -type d -prune -exec rm -rf {} +
for b in ray/_raylet.so ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server; do
    strip --strip-unneeded "$stage/site/$b"
done
chmod +x "$stage"/site/ray/core/src/ray/raylet/raylet "$stage"/site/ray/core/src/ray/gcs/gcs_server
tar -C "$stage/site" -cJf "$OUT.part" .
mv "$OUT.part" "$OUT"
ls -la "$OUT"
