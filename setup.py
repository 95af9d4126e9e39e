"""Build fastsfu's Cython datapath (fastsfu._rtp) and generate the protobuf modules from proto/.

Metadata lives in pyproject.toml. Generated code is produced here at build time, never committed.
"""

from __future__ import annotations

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
GENERATED = ROOT / "src" / "fastsfu" / "_proto"


def generate_protos() -> None:
    """protoc (from grpcio-tools) into src/: the .proto files sit under a fastsfu/_proto/ root, so
    the generated modules import each other inside the package (harmony.md §1.3)."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")  # google/protobuf/*.proto
    outputs = ["--python_out=src", "--grpc_python_out=src", "--pyi_out=src"]
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *outputs, *protos]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
    finally:
        os.chdir(cwd)
    for directory in [GENERATED, *(p for p in GENERATED.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    doc = '"""Protobuf modules generated at build time from proto/ (not committed)."""\n'
    (GENERATED / "__init__.py").write_text(doc)


generate_protos()

extensions = [
    Extension(
        "fastsfu._rtp",
        ["src/fastsfu/_rtp.pyx"],
        # No libsrtp headers or library: libsrtp is reached through function pointers taken
        # from pylibsrtp's bundled build at run time (transport.md §7).
        # OpenSSL (for Discord's AEAD modes, _aead.h) likewise, through pointers set at import.
        include_dirs=["src/fastsfu"],
        depends=["src/fastsfu/_aead.h"],
        extra_compile_args=["-O2", "-fno-strict-aliasing"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
        include_path=["src"],
    ),
)
