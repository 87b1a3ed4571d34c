#!/usr/bin/env bash
# Regenerates fedff/v1/*_pb2*.py from proto/ with the pinned grpcio-tools (the dev extra).
# CI runs it and fails on any diff, so the committed code always matches the .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/fedff/v1/worker.proto
