"""Generates the gRPC code from protos/ into nitsum_jax/server/_proto/ at build and install time.

The generated modules are never committed or edited; every `pip install .` and
`pip install -e .` (editable) regenerates them with grpcio-tools. Everything else about the
package lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    """build_py that first runs protoc (also for editable installs, whose build runs build_py)."""

    def run(self):
        import sys

        sys.path.insert(0, str(ROOT / "nitsum_jax" / "server" / "_proto"))
        try:
            import codegen  # nitsum_jax/server/_proto/codegen.py, importable without the package's deps
        finally:
            sys.path.pop(0)
        for path in codegen.generate(ROOT):
            self.announce(f"generated {path.relative_to(ROOT)}", level=2)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
