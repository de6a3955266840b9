#!/usr/bin/env bash
# Run here (not on the GPU machine): fetch the GPU build of onnxruntime and watchdog for the
# target node's Python 3.12, and cut them into pieces for a size-limited transfer.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl/full
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/full \
    onnxruntime-gpu==1.31.1 watchdog==7.1.0
(cd .whl/full && sha256sum ./*.whl > SHA256SUMS)
cat .whl/full/onnxruntime_gpu-*.whl > .whl/ort.bin
split -b 44M -d .whl/ort.bin .whl/piece-
rm .whl/ort.bin
for piece in .whl/piece-*; do
    n=${piece##*-}; mkdir -p ".whl/p$n"; mv "$piece" ".whl/p$n/"
done
# The small files ride with the last piece.
last=$(ls -d .whl/p* | sort | tail -n 1)
cp .whl/full/watchdog-*.whl .whl/full/SHA256SUMS "$last/"
# segd itself, built here: the device has no registry to build it with.
python3 -m pip wheel -q --no-deps -w "$last" .
echo "wheel name: $(basename .whl/full/onnxruntime_gpu-*.whl)" > "$last/NAME"
basename .whl/full/onnxruntime_gpu-*.whl >> "$last/NAME"
rm -rf .whl/full
ls -la .whl/*
echo "now transfer one folder at a time, in order (see docs/gpu.md)"
