"""Builds fulmine's C kernels (fulmine/kernels/*.c); everything else is in pyproject.toml.

The extension is plain C against Python's headers only (no torch headers), so pip's isolated
build needs nothing but setuptools and a C compiler. If it cannot be built (no compiler), the
install still succeeds and fulmine runs its pure-PyTorch paths instead.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 (any build failure means: fall back)
            print(f"fulmine: C kernels not built ({error}); the PyTorch fallback will be used", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            print(f"fulmine: C kernels not built ({error}); the PyTorch fallback will be used", file=sys.stderr)


# one extension, _cpu: its files and what each holds are listed in fulmine/kernels/cpu.h
SOURCES = (
    "_cpu",
    "pool",
    "blocks32",
    "kquants",
    "interleaved",
    "interleaved_k",
    "matmul",
    "attention",
    "decoder",
    "sample",
)
kernels = Extension(
    "fulmine.kernels._cpu",
    sources=[f"fulmine/kernels/{name}.c" for name in SOURCES],
    depends=["fulmine/kernels/quant.h", "fulmine/kernels/cpu.h"],
    extra_compile_args=["-O3", "-fno-math-errno", "-fvisibility=hidden"] if sys.platform != "win32" else ["/O2"],
    libraries=["pthread"] if sys.platform != "win32" else [],
)

setup(ext_modules=[kernels], cmdclass={"build_ext": OptionalBuildExt})
