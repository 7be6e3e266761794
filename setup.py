"""Build the adapeft extension: C++ CPU kernels always, CUDA kernels when torch and nvcc allow.

ADAPEFT_CUDA=auto (default) builds the CUDA kernels when torch is a CUDA build and a CUDA toolkit is
found; ADAPEFT_CUDA=0 never builds them; ADAPEFT_CUDA=1 requires them and fails loudly otherwise.
TORCH_CUDA_ARCH_LIST is respected; without it we build for sm_80 and sm_90 (+PTX for newer chips).
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
except ImportError:
    sys.exit(
        "adapeft compiles against the PyTorch you already have, and none was found in this build "
        "environment: install torch first (e.g. `pip install torch`), then run "
        "`pip install --no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_MODE = os.environ.get("ADAPEFT_CUDA", "auto").strip().lower()
if CUDA_MODE not in ("auto", "0", "1"):
    sys.exit(f"ADAPEFT_CUDA must be auto, 0 or 1, not {CUDA_MODE!r}")


def _toolkit_with_cudart():
    """The CUDA toolkit folder that really holds libcudart.

    torch guesses CUDA_HOME as the parent of the `nvcc` found on PATH, which is wrong when that nvcc
    is a wrapper script (e.g. /usr/local/bin/nvcc): the build then cannot find libcudart.
    """
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as script:  # a wrapper names the real nvcc somewhere inside
            head = script.read(4096)
        if head.startswith(b"#!"):
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(
            os.path.join(home, "lib*", "libcudart.so*")
        ):
            return home
    return None


if CUDA_MODE != "0" and torch.version.cuda and not (
    os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
):
    toolkit = _toolkit_with_cudart()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit

# Imported only now: cpp_extension fixes CUDA_HOME at import time.
from torch.utils import cpp_extension  # noqa: E402


def _want_cuda():
    reasons = []
    if not torch.version.cuda:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        reasons.append("no CUDA toolkit (nvcc) was found; set CUDA_HOME")
    if CUDA_MODE == "1" and reasons:
        sys.exit("ADAPEFT_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    if CUDA_MODE == "auto" and reasons:
        print("adapeft: building CPU kernels only (" + "; ".join(reasons) + ")", file=sys.stderr)
    return CUDA_MODE != "0" and not reasons


def _shared_cxx_runtime_args():
    """Link the C++ runtime that torch uses, as a shared library.

    Some toolchains ship only a static libstdc++ (seen: a GCC under /opt/gcc set as CXX). Linking it
    into the extension gives the process a second, uninitialised copy whose stream code crashes on the
    first number formatted into an error message. The process already holds the shared runtime (torch
    loaded it): name that file explicitly so the linker resolves everything against it.
    """
    compiler = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    try:
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if "libstdc++.so" in line]
    except OSError:
        return []
    return [loaded[0]] if loaded else []


def _nvidia_wheel_includes():
    """Headers that CUDA torch wheels ship (cuBLAS/cuSPARSE, needed by ATen/cuda/CUDAContext.h)."""
    found = []
    for entry in sys.path:
        found += sorted(glob.glob(os.path.join(entry, "nvidia", "cu*", "include")))
    return [path for path in dict.fromkeys(found) if os.path.isdir(path)]


def extensions():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: restore exactness relies on the same rounding in every code path, which
    # a fused multiply-add would silently change. -g0 undoes the -g of Python's own flags: debug
    # information for torch's templates takes a third of the compile time (ADAPEFT_DEBUG=1 keeps it).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + ([] if os.environ.get("ADAPEFT_DEBUG") == "1" else ["-g0"])
    define_macros = []
    extra_link_args = ["-fopenmp"] + _shared_cxx_runtime_args()
    include_dirs = [os.path.join(HERE, "csrc")]
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "adapeft._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=extra_link_args,
                define_macros=define_macros,
            )
        ]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    define_macros.append(("ADAPEFT_WITH_CUDA", None))
    include_dirs += _nvidia_wheel_includes()
    nvcc = ["-O3", "-fmad=false", "--expt-relaxed-constexpr", "-lineinfo"]
    return [
        cpp_extension.CUDAExtension(
            "adapeft._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=extra_link_args,
            define_macros=define_macros,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
