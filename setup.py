"""Build of the C++ CPU kernels of efficient-attention (the metadata is in pyproject.toml).

The extension ``efficient_attention.kernels._C`` is built with ``torch.utils.cpp_extension``
against the torch installed in the build environment, hence ``pip install --no-build-isolation``.
Set ``EA_BUILD_EXT=0`` to skip it (the library then uses its PyTorch path on the CPU).
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def ext_modules():
    if os.environ.get("EA_BUILD_EXT", "1") == "0":
        return [], {}
    csrc = ROOT / "efficient_attention" / "kernels" / "csrc"
    sources = sorted(str(p.relative_to(ROOT)) for p in csrc.rglob("*.cpp"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
    ext = CppExtension(
        "efficient_attention.kernels._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"]
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


exts, cmdclass = ext_modules()
setup(ext_modules=exts, cmdclass=cmdclass)
