"""The committed gRPC code in server/rpc/gen/ is what scripts/gen_proto.sh makes from proto/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "server" / "rpc" / "gen"

# Lines that only say which protoc / grpcio-tools made the file: a newer tool is not a stale file.
_VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)", re.S), "ValidateProtobufRuntimeVersion(X)"),
    (re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M), "GRPC_GENERATED_VERSION = X"),
]


def _normalised(path: Path) -> str:
    text = path.read_text()
    for pattern, replacement in _VERSION_STAMPS:
        text = pattern.sub(replacement, text)
    return text


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    env = os.environ | {"PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env)
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    assert fresh.keys() == committed.keys(), "run scripts/gen_proto.sh and commit server/rpc/gen/"
    stale = [name for name in fresh if _normalised(fresh[name]) != _normalised(committed[name])]
    assert not stale, f"server/rpc/gen/ is out of date with proto/ ({stale}); run scripts/gen_proto.sh"


def test_generated_code_imports_as_a_package() -> None:
    from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc

    assert janus_pb2.DESCRIPTOR.package == "janus.v1"
    assert janus_pb2.DESCRIPTOR.name == "janus/v1/janus.proto"  # the name reflection clients see
    assert set(janus_pb2.DESCRIPTOR.services_by_name["Janus"].methods_by_name) == {
        "Understand", "UnderstandStream", "Generate", "GenerateStream"}
    assert hasattr(janus_pb2_grpc, "JanusStub")
