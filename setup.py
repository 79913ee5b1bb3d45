"""Builds the reid_ops C++/CUDA extension.

CPU kernels are always built. CUDA kernels are added when a CUDA toolkit is found and torch is a
CUDA build, unless REID_OPS_CPU_ONLY=1. Without a GPU to detect, set TORCH_CUDA_ARCH_LIST
(e.g. "8.0;9.0"); on machines whose `nvcc` is a wrapper, also set CUDA_HOME=/usr/local/cuda.

    pip install --no-build-isolation -e .
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("REID_OPS_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_library_includes() -> list[str]:
    """Header folders of the CUDA math libraries shipped as pip wheels (nvidia-*), which a bare
    CUDA toolkit may lack (ATen's CUDA headers include cusparse.h / cublas_v2.h)."""
    try:
        import nvidia  # the namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += [os.path.dirname(h) for h in glob.glob(os.path.join(base, "*", "include", "cusparse.h"))]
    return sorted(set(found))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "autograd", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"]
    if want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        return CUDAExtension(
            "reid_ops._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            include_dirs=cuda_library_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("reid_ops._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])


setup(
    name="reid_ops",
    version="0.1.0",
    description="Fast re-ID ops (distances, kNN, k-reciprocal re-ranking, Jaccard graph, GeM, metrics)",
    packages=["reid_ops"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
