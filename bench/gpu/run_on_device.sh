#!/usr/bin/env bash
# On the GPU machine, in the last call: reassemble and install the GPU wheel, install segd,
# then run the GPU benchmark. Results go to $OUT (they come back to the caller).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
bash bench/gpu/receive_piece.sh >/dev/null
cd /tmp/segd-pieces
name=$(tail -n 1 NAME)
cat piece-* > "$name"
grep -F "$name" SHA256SUMS | sha256sum -c -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$name" watchdog-*.whl segd-*.whl
cd - >/dev/null
export PYTHONPATH=/tmp/site
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_device())"
python3 -m segd doctor --config config.yaml 2>&1 | tee "${OUT:-/tmp}/doctor.txt" || true
python3 bench/bench_gpu.py --out "${OUT:-/tmp}/gpu.json" 2>&1 | tee "${OUT:-/tmp}/bench_gpu.txt"
