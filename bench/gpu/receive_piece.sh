#!/usr/bin/env bash
# On the GPU machine: keep one carried piece of the wheel in /tmp until the last call.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p /tmp/segd-pieces
cp .whl/p*/* /tmp/segd-pieces/
ls -la /tmp/segd-pieces
