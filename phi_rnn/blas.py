"""The GEMMs of the compiled kernels: float32 through libxsmm or MKL, float64 through MKL.

MKL (libmkl_rt from the `mkl` wheel or a conda env) is loaded into the process with llvmlite
so that compiled kernels resolve its functions by symbol name: a call costs ~0.05 us from
numba instead of ~2 us through ctypes from Python, and the kernels stay cacheable (no
process-specific addresses baked into them). Pointers are passed as integers
(`array.ctypes.data`): on x86-64 a pointer and an int64 travel the same way.

The kernels' float32 GEMM is the symbol `phi_rnn_sgemm`, with cblas_sgemm's signature. It is
bound to native/small_gemm.c (libxsmm's JIT kernels for every product MKL would run on one
thread, MKL for the rest) when `make native` built it, else to MKL's cblas_sgemm itself.
set_backend switches between libxsmm and MKL at any time, also after the kernels compiled.
"""
import ctypes
import glob
import os
import sys
from pathlib import Path

from llvmlite import binding
from numba import types

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

_ENV_PATH = "PHI_RNN_MKL_RT"


def _find_mkl_rt():
    if os.environ.get(_ENV_PATH):
        return os.environ[_ENV_PATH]
    prefixes = [sys.prefix, os.environ.get("CONDA_PREFIX", "")]
    for prefix in prefixes:
        if prefix:
            found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
            if found:
                return found[0]
    raise ImportError(
        "libmkl_rt not found: install the `mkl` package (pip install mkl) "
        f"or point {_ENV_PATH} at libmkl_rt.so"
    )


MKL_RT_PATH = _find_mkl_rt()
binding.load_library_permanently(MKL_RT_PATH)
_mkl = ctypes.CDLL(MKL_RT_PATH)

_i32 = types.int32
_f32 = types.float32
_ptr = types.intp
# void cblas_sgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
sgemm = types.ExternalFunction(
    "phi_rnn_sgemm",
    types.void(_i32, _i32, _i32, _i32, _i32, _i32, _f32, _ptr, _i32, _ptr, _i32, _f32, _ptr, _i32),
)
_f64 = types.float64
dgemm = types.ExternalFunction(
    "cblas_dgemm",
    types.void(_i32, _i32, _i32, _i32, _i32, _i32, _f64, _ptr, _i32, _ptr, _i32, _f64, _ptr, _i32),
)

# int mkl_set_num_threads_local(int n): this thread's MKL thread count; 0 = back to global.
# MKL called inside a numba prange must run sequentially: left to its global count it opens
# nested regions that cost ~3x on a 2-core machine (measured).
set_num_threads_local = types.ExternalFunction("MKL_Set_Num_Threads_Local", types.int32(types.int32))


# native/build/libsmall_gemm.so of this source tree, or a build elsewhere
SMALL_GEMM_PATH = Path(os.environ.get("PHI_RNN_SMALL_GEMM")
                       or Path(__file__).resolve().parent.parent / "native" / "build" / "libsmall_gemm.so")
SMALL_GEMM_MISSING = "libxsmm backend not built: apt install libxsmm-dev (or conda install libxsmm), then `make native`"
BACKENDS = ("libxsmm", "mkl")


def _address(library, name):
    return ctypes.cast(getattr(library, name), ctypes.c_void_p).value


def _bind_sgemm():
    """Bind phi_rnn_sgemm; returns the small_gemm library, or None when it is not built."""
    if not SMALL_GEMM_PATH.exists():
        binding.add_symbol("phi_rnn_sgemm", _address(_mkl, "cblas_sgemm"))
        return None
    lib = ctypes.CDLL(str(SMALL_GEMM_PATH))
    lib.phi_gemm_init(ctypes.c_void_p(_address(_mkl, "cblas_sgemm")),
                      ctypes.c_void_p(_address(_mkl, "MKL_Get_Max_Threads")))
    lib.phi_gemm_target.restype = ctypes.c_char_p
    binding.add_symbol("phi_rnn_sgemm", _address(lib, "phi_sgemm"))
    return lib


_small_gemm = _bind_sgemm()
_backend = "mkl"


def default_backend():
    return "libxsmm" if _small_gemm is not None else "mkl"


def set_backend(name):
    """Run the float32 GEMMs on `name` ("libxsmm" or "mkl") from now on."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "libxsmm" and _small_gemm is None:
        raise ValueError(SMALL_GEMM_MISSING)
    if _small_gemm is not None:
        _small_gemm.phi_gemm_set_backend(int(name == "libxsmm"))
    _backend = name


def backend():
    return _backend


def describe_backend():
    """One line for reports: the backend and, for libxsmm, the instruction set it generates."""
    if _backend == "libxsmm":
        return f"libxsmm ({_small_gemm.phi_gemm_target().decode()} kernels; MKL for threaded GEMMs)"
    return f"mkl {mkl_version()}"


def count_calls(on):
    """Start (and zero) or stop counting the float32 GEMM calls per library. The counters live
    in small_gemm: without it there is nothing to stop, and starting is refused."""
    if _small_gemm is None:
        if on:
            raise ValueError(SMALL_GEMM_MISSING)
        return
    _small_gemm.phi_gemm_count_calls(int(on))


def calls():
    """(libxsmm, mkl) float32 GEMM calls since count_calls(True) (small_gemm built only)."""
    if _small_gemm is None:
        raise ValueError(SMALL_GEMM_MISSING)
    out = (ctypes.c_ulonglong * 2)()
    _small_gemm.phi_gemm_calls(out)
    return out[0], out[1]


set_backend(default_backend())


def mkl_version():
    """MKL's version number, e.g. "2026.2" (its whole version string if that has none)."""
    buf = ctypes.create_string_buffer(256)
    _mkl.MKL_Get_Version_String(buf, 256)
    text = buf.value.decode(errors="replace").strip()
    return text.split("Version ")[1].split()[0].split("-")[0] if "Version " in text else text
