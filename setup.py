"""Build fastsfu's Cython datapath (fastsfu._rtp) and generate the protobuf modules from proto/.

Metadata lives in pyproject.toml. Generated code (C, protobuf modules) is produced by the build
commands below, never committed, never shipped in the sdist; merely loading this file does nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Command, Extension, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
SRC = ROOT / "src"
# protoc outputs per .proto file (python, grpc, stubs), all three written next to each other.
PROTO_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
LINUX_ONLY = (
    "fastsfu builds and runs on Linux only: its datapath uses epoll, recvmmsg/sendmmsg and "
    f"IP_PKTINFO (this is {sys.platform})"
)


def _protos() -> list[str]:
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


class build_proto(Command):  # noqa: N801 (distutils command names are lower case)
    """protoc (from grpcio-tools) into the package: the .proto files sit under a fastsfu/_proto/
    root, so the generated modules import each other inside the package
    (docs/harmony.md#code-generation). Writes to build_lib, or into src/ for an editable install
    (PEP 660: generated files go next to the sources)."""

    description = "generate fastsfu._proto from proto/ with grpcio-tools"
    user_options: list[tuple[str, str | None, str]] = []
    editable_mode = False

    def initialize_options(self) -> None:
        self.build_lib: str | None = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _out(self) -> Path:
        return SRC if self.editable_mode else Path(self.build_lib or "build/lib")

    def get_source_files(self) -> list[str]:
        return [f"proto/{p}" for p in _protos()]

    def get_outputs(self) -> list[str]:
        out, files = self._out(), []
        for proto in _protos():
            stem = proto.removesuffix(".proto")
            files += [str(out / f"{stem}{s}") for s in PROTO_SUFFIXES]
        return files + [str(p / "__init__.py") for p in self._packages(out)]

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def _packages(self, out: Path) -> list[Path]:
        dirs = {out / "fastsfu" / "_proto"}
        for proto in _protos():
            parent = (out / proto).parent
            while parent != out / "fastsfu":
                dirs.add(parent)
                parent = parent.parent
        return sorted(dirs)

    def run(self) -> None:
        import grpc_tools
        from grpc_tools import protoc

        out = self._out()
        out.mkdir(parents=True, exist_ok=True)
        protos = _protos()
        if not protos:
            raise RuntimeError(f"no .proto files under {PROTO_ROOT}: the source tree is incomplete")
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")  # google/protobuf/*.proto
        outputs = [f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}"]
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *outputs]
        if protoc.main(args + [str(PROTO_ROOT / p) for p in protos]) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        for directory in self._packages(out):
            (directory / "__init__.py").touch()
        doc = '"""Protobuf modules generated at build time from proto/ (not committed)."""\n'
        (out / "fastsfu" / "_proto" / "__init__.py").write_text(doc)


class build_with_proto(build):  # noqa: N801
    """`build` runs build_proto before build_py and build_ext (editable installs included)."""

    sub_commands = [("build_proto", None), *build.sub_commands]


class cython_build_ext(build_ext):  # noqa: N801
    """Cythonize at build time only (the sdist carries the .pyx, never the generated C)."""

    def run(self) -> None:
        if not sys.platform.startswith("linux"):
            raise SystemExit(f"error: {LINUX_ONLY}")
        super().run()

    def build_extension(self, ext: Extension) -> None:
        from Cython.Build import cythonize

        (done,) = cythonize(
            [ext],
            compiler_directives={"language_level": "3", "embedsignature": True},
            include_path=["src"],
            build_dir=os.path.join(self.build_temp, "cython"),
        )
        ext.sources = done.sources
        super().build_extension(ext)


extensions = [
    Extension(
        "fastsfu._rtp",
        ["src/fastsfu/_rtp.pyx"],
        # No libsrtp headers or library: libsrtp is reached through function pointers taken
        # from pylibsrtp's bundled build at run time (docs/transports.md#srtp).
        # OpenSSL (for Discord's AEAD modes, _aead.h) likewise, through pointers set at import.
        include_dirs=["src/fastsfu"],
        depends=["src/fastsfu/_aead.h", "src/fastsfu/_csys.pxd", "src/fastsfu/_rtp.pxd"],
        extra_compile_args=["-O2", "-fno-strict-aliasing"],
    ),
]

setup(
    ext_modules=extensions,
    cmdclass={"build": build_with_proto, "build_proto": build_proto, "build_ext": cython_build_ext},
)
