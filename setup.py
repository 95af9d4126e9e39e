"""Build fastsfu's Cython datapath (fastsfu._rtp); metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "fastsfu._rtp",
        ["src/fastsfu/_rtp.pyx"],
        # No libsrtp headers or library: libsrtp is reached through function pointers taken
        # from pylibsrtp's bundled build at run time (transport.md §7).
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
