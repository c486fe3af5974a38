"""The GEMMs of the compiled kernels: float32 through MKL, oneDNN, OpenBLAS or libxsmm,
float64 through MKL.

MKL (libmkl_rt from the `mkl` wheel or a conda env) is loaded into the process with llvmlite
so that compiled kernels resolve its functions by symbol name: a call costs ~0.05 us from
numba instead of ~2 us through ctypes from Python, and the kernels stay cacheable (no
process-specific addresses baked into them). Pointers are passed as integers
(`array.ctypes.data`): on x86-64 a pointer and an int64 travel the same way.

The kernels' float32 GEMM is the symbol `phi_rnn_sgemm`, with cblas_sgemm's signature,
bound to a compiled dispatcher (`_dispatch_sgemm`). Products MKL
would run on one thread (inside phi_rnn's per-thread blocks, or every product when phi_rnn
runs on one thread) go to the chosen small-GEMM library; the ones MKL threads stay on MKL:

- "onednn": oneDNN's dnnl_sgemm from the `onednn-cpu-gomp` wheel (a dependency): JIT
  kernels chosen by the CPU's instruction sets, not its vendor, so fast on AMD CPUs too. It
  is the build on GNU OpenMP, the runtime numba's workers and MKL already share: called
  inside a parallel region it runs on its caller's thread and starts none (the dispatcher
  sends it only such products, or those of a one-thread process).
- "openblas": OpenBLAS from the `scipy-openblas32` wheel (a dependency, so every install
  has it), set to one thread: it only ever runs products that must stay on their thread.
- "libxsmm": libxsmm's JIT kernels through native/small_gemm.c, where `make native` built
  it (libxsmm installed); libxsmm declines some products (small_gemm.c), MKL runs those.
- "mkl": MKL for all.
- "libxsmm+onednn" (any two): the first for the per-step products, the second for the
  whole-sequence ones (STEP_ROWS below).

The choice lives in a word of memory the compiled code reads on every call (set_backend
changes it at any time, also after the kernels compiled). Until a backend is set it is
"mkl"; the default, the fastest library on this machine, is measured and kept by
gemm_choice.py when training, sampling or a benchmark first needs it (gemm_choice.use_default):
importing this module measures nothing.
"""
import contextlib
import ctypes
import os
import sys
from pathlib import Path

import numpy as np
from llvmlite import binding, ir
from numba import cfunc, njit, types
from numba.extending import intrinsic, overload

from phi_rnn import native

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _find_mkl_rt():
    path = native.mkl_rt_path()
    if path is None:
        raise ImportError("libmkl_rt not found: install the `mkl` package (pip install mkl) "
                          f"or point {native.MKL_RT_ENV} at libmkl_rt.so")
    return path


MKL_RT_PATH = _find_mkl_rt()
binding.load_library_permanently(MKL_RT_PATH)
_mkl = ctypes.CDLL(MKL_RT_PATH)

_i32 = types.int32
_f32 = types.float32
_ptr = types.intp
_f64 = types.float64
# void cblas_dgemm(layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
dgemm = types.ExternalFunction(
    "cblas_dgemm",
    types.void(_i32, _i32, _i32, _i32, _i32, _i32, _f64, _ptr, _i32, _ptr, _i32, _f64, _ptr, _i32),
)
_SGEMM_ARGS = (_i32, _i32, _i32, _i32, _i32, _i32, _f32, _ptr, _i32, _ptr, _i32, _f32, _ptr, _i32)
# The four float32 GEMMs, each bound to an address below (symbol names of phi_rnn's own,
# so that no other library's cblas_sgemm in the process can stand in for them).
_mkl_sgemm = types.ExternalFunction("phi_rnn_mkl_sgemm", types.void(*_SGEMM_ARGS))
_openblas_sgemm = types.ExternalFunction("phi_rnn_openblas_sgemm", types.void(*_SGEMM_ARGS))
_xsmm_sgemm = types.ExternalFunction("phi_rnn_xsmm_sgemm", types.int32(*_SGEMM_ARGS))
# dnnl_status_t dnnl_sgemm(char transa, char transb, dim_t m, n, k, float alpha, const float *a,
# dim_t lda, const float *b, dim_t ldb, float beta, float *c, dim_t ldc): row-major, 0 = done.
_i64 = types.int64
_onednn_sgemm = types.ExternalFunction("phi_rnn_onednn_sgemm", types.int32(
    types.int8, types.int8, _i64, _i64, _i64, _f32, _ptr, _i64, _ptr, _i64, _f32, _ptr, _i64))
# GNU OpenMP's view of the calling thread: oneDNN starts threads unless one of these holds.
_omp_in_parallel = types.ExternalFunction("phi_rnn_omp_in_parallel", types.int32())
_omp_max_threads = types.ExternalFunction("phi_rnn_omp_get_max_threads", types.int32())
_DNNL_T, _DNNL_N = np.int8(ord("T")), np.int8(ord("N"))  # dnnl_sgemm's transposition characters
_mkl_max_threads = types.ExternalFunction("MKL_Get_Max_Threads", types.int32())

# int mkl_set_num_threads_local(int n): this thread's MKL thread count; 0 = back to global.
# MKL called inside a numba prange must run sequentially: left to its global count it opens
# nested regions that cost ~3x on a 2-core machine (measured).
set_num_threads_local = types.ExternalFunction("MKL_Set_Num_Threads_Local", types.int32(types.int32))

BACKENDS = ("libxsmm", "onednn", "openblas", "mkl")
_CODES = {"mkl": 0, "libxsmm": 1, "openblas": 2, "onednn": 3}
# A product with fewer rows than this and A not transposed is a per-step one (a recurrence's
# batch rows times a weight matrix, 50 times an iteration); the rest run over all steps at
# once (input projections and gradients, weight gradients x^T dG, the decoder). Libraries
# differ per kind: libxsmm's hsw kernels run the per-step products fastest and the
# transposed weight gradients at half OpenBLAS's rate (bench/README.md).
STEP_ROWS = 256
KINDS = ("step", "sequence")


def _address(library, name):
    return ctypes.cast(getattr(library, name), ctypes.c_void_p).value


# ---------------------------------------------------------------- the libraries

SMALL_GEMM_PATH = native.small_gemm_path()
SMALL_GEMM_MISSING = "libxsmm backend not built: apt install libxsmm-dev (or conda install libxsmm), then `make native`"
_OPENBLAS_ENV = "PHI_RNN_OPENBLAS"  # a libscipy_openblas.so elsewhere, or a path naming no file: none
OPENBLAS_MISSING = "openblas backend not installed: pip install scipy-openblas32"
_ONEDNN_ENV = "PHI_RNN_ONEDNN"  # a libdnnl.so.3 elsewhere, or a path naming no file: none
ONEDNN_MISSING = "onednn backend not installed: pip install onednn-cpu-gomp"
MISSING = {"libxsmm": SMALL_GEMM_MISSING, "openblas": OPENBLAS_MISSING, "onednn": ONEDNN_MISSING}


def _load_small_gemm():
    if not SMALL_GEMM_PATH.exists():
        return None
    lib = ctypes.CDLL(str(SMALL_GEMM_PATH))
    if not hasattr(lib, "phi_xsmm_version"):  # built from an older small_gemm.c
        print(f"phi_rnn: warning: {SMALL_GEMM_PATH} is an older build: run `make native`; libxsmm not used",
              file=sys.stderr)
        return None
    lib.phi_xsmm_init()
    lib.phi_xsmm_target.restype = ctypes.c_char_p
    lib.phi_xsmm_version.restype = ctypes.c_char_p
    return lib


def _openblas_path():
    if os.environ.get(_OPENBLAS_ENV):
        return Path(os.environ[_OPENBLAS_ENV])
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return Path(scipy_openblas32.get_lib_dir()) / f"lib{scipy_openblas32.get_library()}.so"


def _load_openblas():
    path = _openblas_path()
    if path is None or not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    # OpenBLAS runs only products that must stay on their thread (numba's workers, or the
    # one thread of a one-thread run): its own threads would oversubscribe the cores. Its
    # global count is this library copy's alone (numpy and scipy carry their own copies).
    lib.scipy_openblas_set_num_threads(1)
    lib.scipy_openblas_get_config.restype = ctypes.c_char_p
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return lib


class _DnnlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


_DNNL_RUNTIME_OMP = 2


def _onednn_path():
    if os.environ.get(_ONEDNN_ENV):
        return Path(os.environ[_ONEDNN_ENV])
    from importlib import metadata
    try:
        files = metadata.distribution("onednn-cpu-gomp").files or []
    except metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name == "libdnnl.so.3"]  # the wheel's data: <prefix>/lib
    return Path(found[0].locate()) if found else None


def _load_onednn():
    path = _onednn_path()
    if path is None or not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
    if lib.dnnl_version().contents.cpu_runtime != _DNNL_RUNTIME_OMP:
        # A TBB or threadpool build would start its own threads inside numba's workers.
        print(f"phi_rnn: warning: {path} is not oneDNN's GNU OpenMP build (onednn-cpu-gomp); oneDNN not used",
              file=sys.stderr)
        return None
    return lib


_small_gemm = _load_small_gemm()
_openblas = _load_openblas()
_onednn = _load_onednn()
# libgomp as loaded in this process (oneDNN's, numba's and MKL's OpenMP runtime).
_gomp = ctypes.CDLL("libgomp.so.1") if _onednn else None
_mkl_sgemm_address = _address(_mkl, "cblas_sgemm")
binding.add_symbol("phi_rnn_mkl_sgemm", _mkl_sgemm_address)
# A library that is missing gets MKL's address: never called (set_backend refuses it), but
# the kernels must link.
binding.add_symbol("phi_rnn_openblas_sgemm",
                   _address(_openblas, "scipy_cblas_sgemm") if _openblas else _mkl_sgemm_address)
binding.add_symbol("phi_rnn_xsmm_sgemm",
                   _address(_small_gemm, "phi_xsmm_sgemm") if _small_gemm else _mkl_sgemm_address)
binding.add_symbol("phi_rnn_onednn_sgemm", _address(_onednn, "dnnl_sgemm") if _onednn else _mkl_sgemm_address)
binding.add_symbol("phi_rnn_omp_in_parallel", _address(_gomp, "omp_in_parallel") if _gomp else _mkl_sgemm_address)
binding.add_symbol("phi_rnn_omp_get_max_threads",
                   _address(_gomp, "omp_get_max_threads") if _gomp else _mkl_sgemm_address)

# The words the compiled dispatcher reads: the backends' codes (per-step products in the low
# byte, whole-sequence ones in the next) and whether to count calls; the counters, one per
# library in code order (MKL, libxsmm, OpenBLAS, oneDNN).
_choice = ctypes.c_int32(0)
_counting = ctypes.c_int32(0)
_calls = (ctypes.c_uint64 * len(_CODES))()
binding.add_symbol("phi_rnn_gemm_choice", ctypes.addressof(_choice))
binding.add_symbol("phi_rnn_gemm_counting", ctypes.addressof(_counting))
binding.add_symbol("phi_rnn_gemm_calls", ctypes.addressof(_calls))


def _external_global(builder, name, ty):
    module = builder.module
    try:
        return module.get_global(name)
    except KeyError:
        variable = ir.GlobalVariable(module, ty, name)
        variable.linkage = "external"
        return variable


def _word_reader(symbol):
    """An intrinsic returning the int32 at the process symbol `symbol`, read at run time."""
    @intrinsic
    def read(typingctx):
        def codegen(context, builder, signature, args):
            return builder.load(_external_global(builder, symbol, ir.IntType(32)))
        return types.int32(), codegen
    return read


_read_choice = _word_reader("phi_rnn_gemm_choice")
_read_counting = _word_reader("phi_rnn_gemm_counting")


@intrinsic
def _count_call(typingctx, index):
    """Atomically add 1 to the calls of the library with code `index`."""
    def codegen(context, builder, signature, args):
        counters = _external_global(builder, "phi_rnn_gemm_calls", ir.ArrayType(ir.IntType(64), len(_CODES)))
        slot = builder.gep(counters, [ir.Constant(ir.IntType(32), 0), args[0]])
        builder.atomic_rmw("add", slot, ir.Constant(ir.IntType(64), 1), "monotonic")
        return context.get_dummy_value()
    return types.void(index), codegen


@cfunc(types.void(*_SGEMM_ARGS), cache=True)
def _dispatch_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """cblas_sgemm on the chosen backend (module docstring); a, b, c are addresses."""
    choice = _read_choice()
    ran = 0  # the code of the library that ran it
    if choice != 0 and _mkl_max_threads() == 1:
        code = choice & 255 if m < STEP_ROWS and trans_a == NO_TRANS else choice >> 8
        if code == 2:
            _openblas_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
            ran = 2
        elif code == 3 and layout == ROW_MAJOR and (_omp_in_parallel() != 0 or _omp_max_threads() == 1):
            if _onednn_sgemm(_DNNL_T if trans_a == TRANS else _DNNL_N, _DNNL_T if trans_b == TRANS else _DNNL_N,
                             m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0:
                ran = 3
        elif code == 1 and _xsmm_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            ran = 1
    if ran == 0:
        _mkl_sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
    if _read_counting() != 0:
        _count_call(ran)


# The kernels' float32 GEMM: cblas_sgemm's signature, bound to the dispatcher. The kernels
# call it by this name (compiled and cached kernels link to whatever it is bound to here).
binding.add_symbol("phi_rnn_sgemm", _dispatch_sgemm.address)
sgemm = types.ExternalFunction("phi_rnn_sgemm", types.void(*_SGEMM_ARGS))


# ---------------------------------------------------------------- transposes
# MKL's out-of-place transposes (mkl_?omatcopy): a weight matrix (512 x 128 for char-rnn) a
# few times faster than numpy's strided copy, and every update transposes all of them
# (model.transposed_weights). void MKL_Somatcopy(char ordering, char trans, size_t rows,
# size_t cols, float alpha, const float *a, size_t lda, float *b, size_t ldb).
_OMATCOPY_ARGS = (types.int8, types.int8, _ptr, _ptr)
_somatcopy = types.ExternalFunction("MKL_Somatcopy", types.void(*_OMATCOPY_ARGS, _f32, _ptr, _ptr, _ptr, _ptr))
_domatcopy = types.ExternalFunction("MKL_Domatcopy", types.void(*_OMATCOPY_ARGS, _f64, _ptr, _ptr, _ptr, _ptr))
_ROW, _T = np.int8(ord("R")), np.int8(ord("T"))


@njit(cache=True)
def transpose_into(a, out):
    """out (C, R) = a (R, C).T, both C-contiguous float32 or both float64, through MKL."""
    rows, cols = a.shape
    if (out.shape != (cols, rows) or out.itemsize != a.itemsize
            or not (a.flags.c_contiguous and out.flags.c_contiguous)):
        raise ValueError("transpose_into: out must be a's transpose's shape and type, both contiguous")
    if a.itemsize == 4:
        _somatcopy(_ROW, _T, rows, cols, np.float32(1.0), a.ctypes.data, cols, out.ctypes.data, rows)
    else:
        _domatcopy(_ROW, _T, rows, cols, 1.0, a.ctypes.data, cols, out.ctypes.data, rows)


# ---------------------------------------------------------------- choosing

_backend = "mkl"  # the products run on MKL until a backend is set (_choice 0)
_reason = ""


def available():
    """The backends this process can run, in BACKENDS order."""
    present = {"libxsmm": _small_gemm is not None, "onednn": _onednn is not None,
               "openblas": _openblas is not None, "mkl": True}
    return tuple(name for name in BACKENDS if present[name])


def libraries(name):
    """The (per-step, whole-sequence) libraries of backend `name`: "onednn" runs both kinds
    of product on oneDNN, "libxsmm+onednn" the per-step ones on libxsmm."""
    parts = name.split("+")
    if len(parts) > 2 or not all(part in BACKENDS for part in parts):
        raise ValueError(f"unknown GEMM backend {name!r} (choose from {', '.join(BACKENDS)}, "
                         "or per-step+whole-sequence libraries such as libxsmm+onednn)")
    return parts[0], parts[-1]


def set_backend(name, reason=""):
    """Run the float32 GEMMs on `name` from now on; `reason` is what describe_backend says."""
    global _backend, _reason
    step, sequence = libraries(name)
    for library in (step, sequence):
        if library not in available():
            raise ValueError(MISSING[library])
    _choice.value = _CODES[step] | _CODES[sequence] << 8
    _backend, _reason = name, reason


def backend():
    return _backend


@contextlib.contextmanager
def using(name):
    """Run the float32 GEMMs on `name` inside the block, then on the backend before."""
    chosen, reason = _backend, _reason
    set_backend(name)
    try:
        yield
    finally:
        set_backend(chosen, reason)


def library_version(name):
    if name == "openblas":
        return _openblas.scipy_openblas_get_config().decode().split()[1]
    if name == "libxsmm":
        return _small_gemm.phi_xsmm_version().decode()
    if name == "onednn":
        v = _onednn.dnnl_version().contents
        return f"{v.major}.{v.minor}.{v.patch}"
    return mkl_version()


def _describe_library(name):
    if name == "libxsmm":
        return f"libxsmm {library_version(name)} ({_small_gemm.phi_xsmm_target().decode()} kernels)"
    if name == "openblas":
        return f"openblas {library_version(name)} ({_openblas.scipy_openblas_get_corename().decode()} kernels)"
    if name == "onednn":
        isa = _onednn.dnnl_get_effective_cpu_isa()  # dnnl_cpu_isa_t: bit 0x20 AVX-512, 0x4 AVX2
        width = "AVX-512" if isa & 0x20 else "AVX2" if isa & 0x4 else "SSE4.1"
        return f"onednn {library_version(name)} ({width} JIT kernels)"
    return f"mkl {mkl_version()}"


def describe_backend():
    """One line for reports: the backend, what it runs, and why it was chosen."""
    step, sequence = libraries(_backend)
    if step == sequence == "mkl":
        text = f"mkl {mkl_version()}"
    elif step == sequence:
        text = f"{_backend}: {_describe_library(step)} on one thread; MKL for threaded GEMMs"
    else:
        text = (f"{_backend}: {_describe_library(step)} for the per-step products, {_describe_library(sequence)} "
                "for the whole-sequence ones, on one thread; MKL for threaded GEMMs")
    return f"{text}; {_reason}" if _reason else text


# ---------------------------------------------------------------- tables of products (gemm_choice, bench)

def product_table(products):
    """(products as an int64 table of (calls, trans_a, m, n, k), their betas as float32):
    what run_product_table takes."""
    return (np.array([(calls, int(t), m, n, k) for calls, t, m, n, k, _ in products], np.int64),
            np.array([beta for *_, beta in products], np.float32))


@njit(cache=True)
def run_product_table(operands, products, betas, first, stop):
    """Products first..stop-1 of the table, call i of each on its operands' A[i], B, C[i]; an
    A or C of one slice is that slice on every call (a hot operand: the state a step just
    computed). float32 A and B run on the float32 GEMM (sgemm), bfloat16 ones (uint16) on
    bf16.gemm; C is float32."""
    one = np.float32(1.0)
    for p in range(first, stop):
        trans_a = TRANS if products[p, 1] else NO_TRANS
        m, n, k = products[p, 2], products[p, 3], products[p, 4]
        a_steps, b, c_steps = operands[p]
        for i in range(products[p, 0]):
            a, c = a_steps[i % a_steps.shape[0]], c_steps[i % c_steps.shape[0]]
            _table_gemm(ROW_MAJOR, trans_a, NO_TRANS, m, n, k, one, a.ctypes.data, a.shape[1], b, b.shape[1],
                        betas[p], c.ctypes.data, c.shape[1])


def _table_gemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """sgemm's call, or bf16.gemm's where the B array `b` is bfloat16 (compiled code only)."""
    raise NotImplementedError


@overload(_table_gemm, jit_options=dict(cache=True))
def _table_gemm_impl(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    if b.dtype == types.uint16:
        from phi_rnn import bf16  # at compile time: bf16 imports this module

        def bfloat16(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            bf16.gemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b.ctypes.data, ldb, beta, c, ldc)
        return bfloat16

    def float32(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        sgemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b.ctypes.data, ldb, beta, c, ldc)
    return float32


@contextlib.contextmanager
def one_thread():
    """The calling thread's MKL and OpenMP thread counts set to one inside the block (as in a
    one-thread process): its products then go to the small-GEMM backend, and oneDNN, which
    outside a parallel region runs on omp_get_max_threads() threads, stays on this one."""
    previous = _mkl.MKL_Set_Num_Threads_Local(1)
    omp_threads = _gomp.omp_get_max_threads() if _gomp else None
    if _gomp:
        _gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        _mkl.MKL_Set_Num_Threads_Local(previous)
        if _gomp:
            _gomp.omp_set_num_threads(omp_threads)


def vector_width():
    """The widest float vectors this process's libraries use: "AVX-512", "AVX2", or
    "SSE"; with "(AVX2 emulated: ...)" when the environment caps the libraries below
    what the CPU has."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    width = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    caps = [f"{v}={os.environ[v]}" for v in _EMULATION_VARS if os.environ.get(v)]
    return f"{width} (capped: {', '.join(caps)})" if caps else width


# Settings that make the libraries generate code for an older CPU (an AVX2 one emulated).
_EMULATION_VARS = ("NUMBA_CPU_NAME", "MKL_ENABLE_INSTRUCTIONS", "LIBXSMM_TARGET", "OPENBLAS_CORETYPE",
                   "ONEDNN_MAX_CPU_ISA")


def count_calls(on):
    """Start (and zero) or stop counting the float32 GEMM calls per library (off by default:
    a counter shared by the threads would move between cores on every call)."""
    if on:
        for code in _CODES.values():
            _calls[code] = 0
    _counting.value = int(on)


def calls():
    """(small-GEMM libraries, MKL) float32 GEMM calls since count_calls(True)."""
    return sum(_calls[code] for name, code in _CODES.items() if name != "mkl"), _calls[0]


def calls_per_library():
    """{library: float32 GEMM calls since count_calls(True)}."""
    return {name: _calls[code] for name, code in _CODES.items()}


def mkl_version():
    """MKL's version number, e.g. "2026.2" (its whole version string if that has none)."""
    buf = ctypes.create_string_buffer(256)
    _mkl.MKL_Get_Version_String(buf, 256)
    text = buf.value.decode(errors="replace").strip()
    return text.split("Version ")[1].split()[0].split("-")[0] if "Version " in text else text
