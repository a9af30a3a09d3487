"""Runs grpcio-tools' protoc over protos/nitsum/v1/*.proto into this folder.

Used by setup.py at build/install time, and as a safety net on import when the generated
modules are missing from a source checkout. Imports only the standard library and grpc_tools.
"""

from __future__ import annotations

from pathlib import Path

PROTO_DIR = Path("protos") / "nitsum" / "v1"  # relative to the repository root
PACKAGE_DIR = Path("nitsum_jax") / "server" / "_proto"
MODULES = ("serving_pb2.py", "serving_pb2_grpc.py")


def generate(root: Path) -> list[Path]:
    """Generate into `root`/nitsum_jax/server/_proto; returns the written files.

    The proto folder is mapped onto the package path (`-I<package>=<protos>`), so the
    generated gRPC module imports `nitsum_jax.server._proto.serving_pb2` (no top-level
    `nitsum` package, no editing of generated files)."""
    from grpc_tools import protoc
    import importlib.resources

    root = Path(root)
    protos = sorted((root / PROTO_DIR).glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {root / PROTO_DIR}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{PACKAGE_DIR.as_posix()}={(root / PROTO_DIR).as_posix()}", f"-I{well_known}",
            f"--python_out={root}", f"--grpc_python_out={root}", f"--pyi_out={root}"]
    args += [(PACKAGE_DIR / p.name).as_posix() for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]} (args: {args})")
    out = root / PACKAGE_DIR
    return sorted(p for p in out.iterdir() if p.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")))
