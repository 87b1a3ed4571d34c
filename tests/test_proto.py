"""The committed generated code is exactly what the pinned grpcio-tools makes of proto/."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extra")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"),
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "fedff/v1/worker.proto"],
                   check=True, cwd=REPO)
    for name in ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py"):
        fresh = (tmp_path / "fedff" / "v1" / name).read_text()
        committed = (REPO / "fedff" / "v1" / name).read_text()
        assert fresh == committed, (f"fedff/v1/{name} is stale: run scripts/gen_proto.sh "
                                    f"and commit the result")
