"""Builds mas_ext._C: C++ CPU kernels always; CUDA kernels only where torch has CUDA and CUDA_HOME is set.

Install with ``pip install --no-build-isolation -e .`` so the extension compiles against the
torch already installed (an isolated build would download the newest CUDA torch).
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:  # pragma: no cover - the message is the point
    raise SystemExit("mas_ext needs PyTorch installed first; then `pip install --no-build-isolation -e .`") from e

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))

openmp = ["-fopenmp"]  # compile *and* link, or at::parallel_for runs on one thread
cxx_flags = ["-O3", "-std=c++17"] + openmp
# sm_80 (A100) and sm_90 (H100/H200): the bf16 tensor-core tiles need sm_80+; -lineinfo for the profilers and
# compute-sanitizer (no cost at run time). -ftz=false after --use_fast_math: float32 subnormals are kept, as
# torch.optim's Adam keeps them (flushed, a 1e-19 gradient with eps=0 divides by zero).
nvcc_flags = ["-O3", "--use_fast_math", "-ftz=false", "-std=c++17", "-lineinfo",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
ext_kwargs = dict(extra_link_args=openmp, include_dirs=[os.path.join(here, "csrc")])

if torch.version.cuda and CUDA_HOME and cuda_sources:
    ext = CUDAExtension(
        "mas_ext._C",
        sources + cuda_sources,
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **ext_kwargs,
    )
else:
    ext = CppExtension("mas_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, **ext_kwargs)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
