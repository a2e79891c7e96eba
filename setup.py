"""Build of resfuse and its compiled extension ``resfuse._C``.

Install against the PyTorch already in the environment (the extension is compiled for it):

    pip install --no-build-isolation .       # or: pip install .  (pip 23.2 + wheel, no pyproject.toml)
    python setup.py build_ext --inplace      # development

Environment variables:
    RESFUSE_BUILD_CUDA=auto|0|1   CUDA kernels (csrc/cuda/): auto = when torch has CUDA and nvcc is
                                  found (CUDA_HOME); 1 = required (error otherwise); 0 = CPU only.
    TORCH_CUDA_ARCH_LIST          GPU architectures, default "8.0;9.0".
    RESFUSE_CPU_ISA=auto|default|avx2|avx512
                                  vector ISA of the CPU kernels; auto = avx2 when the build CPU has
                                  it. The library then needs that ISA to load: use default for a
                                  build meant for other (older) machines.
    DEBUG=1                       -O0 -g instead of -O3.
    MAX_JOBS                      parallel compile jobs (ninja).

There is deliberately no pyproject.toml: with one, pip builds in an isolated environment that cannot
see the installed torch (and would have to download another, multi-GB one to compile against).
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("resfuse: PyTorch must be installed before building resfuse (the extension is compiled "
             "against it): pip install torch, then pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(*patterns):
    """Files matching the patterns, relative to the repository root (as setuptools wants)."""
    found = []
    for pattern in patterns:
        found += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    return found


def cuda_config():
    """(build the CUDA kernels?, reason) from RESFUSE_BUILD_CUDA, torch's CUDA and nvcc."""
    mode = os.environ.get("RESFUSE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"resfuse: RESFUSE_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is built without CUDA"
    elif not (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))):
        missing = "nvcc not found (set CUDA_HOME)"
    if mode == "0":
        return False, "RESFUSE_BUILD_CUDA=0"
    if missing and mode == "1":
        sys.exit(f"resfuse: RESFUSE_BUILD_CUDA=1 but {missing}")
    if missing:
        return False, missing
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


# Flags of the vector ISA the CPU kernels are compiled for: the CPU_CAPABILITY macros select ATen's
# matching at::vec::Vectorized implementation (without them it is a slow generic one), in a namespace
# of its own, so nothing clashes with libtorch's symbols.
CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def cpu_isa():
    """(ISA, reason) from RESFUSE_CPU_ISA=auto|default|avx2|avx512.

    The whole library is compiled for that ISA, so it only loads on CPUs that have it (like -march).
    auto picks avx2 on an x86-64 build machine whose CPU has it (torch reports AVX2 or AVX512; every
    x86 server CPU since 2013-2015 does), else default. avx512 is opt-in: these kernels are
    memory-bound, and an avx2 build also runs on AVX2-only CPUs.
    """
    choice = os.environ.get("RESFUSE_CPU_ISA", "auto").strip().lower()
    if choice not in ("auto", *CPU_ISA_FLAGS):
        sys.exit(f"resfuse: RESFUSE_CPU_ISA must be auto, {', '.join(CPU_ISA_FLAGS)}, got {choice!r}")
    if choice != "auto":
        return choice, "RESFUSE_CPU_ISA"
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        return "avx2", f"auto: build CPU has {capability}"
    return "default", f"auto: {platform.machine()} CPU, torch capability {capability}"


def extension():
    with_cuda, cuda_reason = cuda_config()
    isa, isa_reason = cpu_isa()
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -Wno-unknown-pragmas / -Wno-psabi: noise from torch's vector headers under Python's -Wall.
    cxx = opt + ["-Wno-unknown-pragmas", "-Wno-psabi"] + CPU_ISA_FLAGS[isa]
    link = []
    # at::parallel_for is inlined into our code: with torch's OpenMP backend (ATen/Config.h sets
    # AT_PARALLEL_OPENMP) its `#pragma omp parallel` only runs in parallel when compiled with
    # -fopenmp. The library then links libgomp.so.1, which resolves to the copy torch has loaded.
    openmp = torch.backends.openmp.is_available() and sys.platform.startswith("linux")
    if openmp:
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # No Python C-API beyond module creation (csrc/ops.cpp), so the library uses the limited API
    # (torch defines Py_LIMITED_API) and one build serves every CPython version. Bindings must
    # therefore not include <torch/extension.h> (pybind11).
    macros = []

    files = sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    kwargs = {"py_limited_api": True, "define_macros": macros, "extra_link_args": link}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        files += sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
        macros.append(("RESFUSE_WITH_CUDA", None))
        nvcc = opt + (["-lineinfo"] if not debug else [])
        ext = CUDAExtension("resfuse._C", files, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("resfuse._C", files, extra_compile_args={"cxx": cxx}, **kwargs)

    print(f"resfuse build: torch {torch.__version__}; "
          f"CUDA kernels {'on' if with_cuda else 'off'} ({cuda_reason})"
          + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "")
          + f"; CPU ISA {isa} ({isa_reason}); OpenMP {'on' if openmp else 'off'}; "
          f"{'DEBUG -O0 -g' if debug else '-O3'}; "
          f"{len(files)} sources", flush=True)
    return ext


setup(
    name="resfuse",
    version="0.1.0",
    description="Fused Conv-BN-ReLU-residual kernels for ResNet-family networks in PyTorch",
    packages=find_packages(include=["resfuse", "resfuse.*"]),
    python_requires=">=3.10",
    # Not torch: the extension is built against the torch already installed, and a torch requirement
    # would let pip replace it (possibly downloading a multi-GB CUDA build of another version).
    install_requires=["numpy"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
