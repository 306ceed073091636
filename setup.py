"""Packaging for efficient-attention.

Installs the library (``efficient_attention``), its fairseq plugin
(``efficient_fairseq``) and its ParaGen plugin (``efficient_transformers``).
The C++ CPU kernels are built with ``torch.utils.cpp_extension`` when present;
set ``EA_BUILD_EXT=0`` to skip them (the library then uses its PyTorch path).
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def ext_modules():
    if os.environ.get("EA_BUILD_EXT", "1") == "0":
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "efficient_attention" / "kernels" / "csrc").rglob("*.cpp"))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = ["-O3", "-g0", "-fopenmp", "-std=c++20"]
    ext = CppExtension("efficient_attention.kernels._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


exts, cmdclass = ext_modules()

setup(
    name="efficient-attention",
    version="0.1.0",
    description="Efficient attention mechanisms for long sequences, with fairseq and ParaGen plugins",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["efficient_attention", "efficient_attention.*"])
    + find_packages("plugins", include=["efficient_fairseq", "efficient_fairseq.*", "efficient_transformers", "efficient_transformers.*"]),
    package_dir={"efficient_fairseq": "plugins/efficient_fairseq", "efficient_transformers": "plugins/efficient_transformers"},
    install_requires=["torch>=2.4,<2.15", "numpy"],
    extras_require={
        "fairseq": ["fairseq-fixed==0.12.3.1", "numpy<2"],
        "test": ["pytest", "pytest-timeout"],
        "bench": ["matplotlib"],
    },
    ext_modules=exts,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["efficient-attention-bench=efficient_attention.benchmark.cli:main"]},
)
