"""Code generated from protos/nitsum/v1/serving.proto (by setup.py at install time; not committed).

`serving_pb2` holds the messages, `serving_pb2_grpc` the stub and servicer base. In a source
checkout whose generated files are missing (e.g. after `git clean`), they are regenerated here
on first import.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[2]  # the repository root in a source checkout

if not all((_HERE / m).is_file() for m in ("serving_pb2.py", "serving_pb2_grpc.py")):
    from nitsum_jax.server._proto import codegen

    if not (_ROOT / codegen.PROTO_DIR).is_dir():
        raise ImportError(f"generated gRPC modules are missing from {_HERE} and there is no "
                          f"{codegen.PROTO_DIR} to regenerate them from: reinstall nitsum-jax")
    codegen.generate(_ROOT)

from nitsum_jax.server._proto import serving_pb2, serving_pb2_grpc  # noqa: E402

__all__ = ["serving_pb2", "serving_pb2_grpc"]
