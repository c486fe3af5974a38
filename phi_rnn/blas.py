"""MKL's cblas_sgemm, callable from nopython numba code.

The library (libmkl_rt from the `mkl` wheel or a conda env) is loaded into the process with
llvmlite so that compiled kernels resolve `cblas_sgemm` by symbol name: the call costs
~0.05 us from numba instead of ~2 us through ctypes from Python, and the kernels stay
cacheable (no process-specific addresses baked into them). Pointers are passed as
integers (`array.ctypes.data`): on x86-64 a pointer and an int64 travel the same way.
"""
import ctypes
import glob
import os
import sys

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
    "cblas_sgemm",
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


def mkl_version():
    buf = ctypes.create_string_buffer(256)
    _mkl.MKL_Get_Version_String(buf, 256)
    return buf.value.decode(errors="replace").strip()
