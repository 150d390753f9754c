"""fcsa: fused cosine-similarity attention.

    import fcsa
    out = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)

The computation runs in libfcsa (a C library with CUDA and CPU backends), reached
through the small binding fcsa._lib; C, C++ or Rust users can link that library
directly: see get_include() and get_library(), and get_cmake_dir() (for
find_package(fcsa)) and get_pkgconfig_dir() (for pkg-config).
"""

import importlib.metadata
import os
import warnings

with warnings.catch_warnings():
    # Without numpy, importing torch warns "Failed to initialize NumPy". fcsa never
    # converts tensors to or from numpy arrays, so that warning says nothing about it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from . import _lib, distributed
from .attention import (flash_cosine_sim_attention, l2norm_tensors,
                        plain_cosine_sim_attention)
from .kvcache import flash_cosine_sim_attention_with_kvcache
from .module import CosineSimAttention
from .varlen import flash_cosine_sim_attention_varlen

__all__ = [
    "__version__",
    "CosineSimAttention",
    "build_info",
    "compiled_sm_targets",
    "cuda_available",
    "cuda_compiled",
    "distributed",
    "flash_cosine_sim_attention",
    "flash_cosine_sim_attention_varlen",
    "flash_cosine_sim_attention_with_kvcache",
    "get_cmake_dir",
    "get_include",
    "get_library",
    "get_pkgconfig_dir",
    "l2norm_tensors",
    "last_backend",
    "plain_cosine_sim_attention",
]

__version__ = importlib.metadata.version("fcsa")

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_include() -> str:
    """The directory holding fcsa.h, the library's C header."""
    return os.path.join(_HERE, "include")


def get_library() -> str:
    """The path of libfcsa.so, the shared library this package runs on."""
    return os.path.join(_HERE, "lib", "libfcsa.so")


def get_cmake_dir() -> str:
    """The directory holding fcsaConfig.cmake: find_package(fcsa) finds the library there
    when given as fcsa_DIR (or in CMAKE_PREFIX_PATH); it defines the target fcsa::fcsa."""
    return os.path.join(_HERE, "lib", "cmake", "fcsa")


def get_pkgconfig_dir() -> str:
    """The directory holding fcsa.pc, for PKG_CONFIG_PATH."""
    return os.path.join(_HERE, "lib", "pkgconfig")


def build_info() -> str:
    """libfcsa's one-line description of its build (version, CUDA, SM targets, CPU)."""
    return _lib.build_info()


def cuda_compiled() -> bool:
    """True if libfcsa was built with its CUDA backends."""
    return _lib.cuda_compiled()


def cuda_available() -> bool:
    """True if libfcsa has CUDA backends and a usable GPU is present."""
    return _lib.cuda_available()


def compiled_sm_targets() -> tuple:
    """The GPU architectures libfcsa was compiled for, e.g. (80, 90)."""
    return _lib.compiled_sm_targets()


def last_backend() -> str:
    """The backend that ran this thread's last successful call: "cpu", "cuda-sm80" or "cuda-sm90"."""
    return _lib.last_backend()
