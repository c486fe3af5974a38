"""bfloat16 for the compiled kernels: whether this CPU runs it natively, the conversions
between float32 and bfloat16, and the GEMM on bfloat16 operands with float32 accumulation
and output.

A bfloat16 number is the upper half of a float32's bits; arrays of them are uint16 arrays
(numba has no bfloat16 type). Rounding is to nearest, ties to even, as the CPU's
vcvtneps2bf16 and PyTorch round; a NaN stays a NaN (quiet, its sign and upper payload
kept), a finite value past bfloat16's largest rounds to infinity, denormals stay denormals.

`gemm` is called from compiled code with cblas_sgemm's arguments, A and B the addresses of
bfloat16 (uint16) arrays, C float32: C = alpha * op(A) @ op(B) + beta * C. It runs on
oneDNN's dnnl_gemm_bf16bf16f32 (the `onednn-cpu-gomp` wheel: JIT kernels by instruction
set, AVX512_BF16 or AMX) or MKL's cblas_gemm_bf16bf16f32, per kind of product as blas.py
tells them apart (per-step products: fewer than blas.STEP_ROWS rows, A not transposed). Both
libraries are the ones blas.py loads. Threads: oneDNN runs on its caller's thread inside an
OpenMP parallel region and on omp_get_max_threads() threads outside one; MKL on the calling
thread's MKL thread count. MKL can also lay out a B operand once (pack_into: the weights,
once per update) for gemm_packed_arrays, which then skips the per-call repacking. The
library at import is default_backend(): MKL on a CPU with AMX, oneDNN on the others; bfloat16
training runs the fastest here instead, measured per machine and kind of product as the
float32 libraries are (gemm_choice.use_default("bf16")).

A CPU without avx512_bf16 or amx_bf16 would run these products in emulation, slower than
float32: require_native() refuses it. ONEDNN_MAX_CPU_ISA capping oneDNN below
AVX512_CORE_BF16 counts as such a CPU (how the refusal is tested on one that has them).
"""
import contextlib
import ctypes
import os

import numpy as np
from llvmlite import binding
from numba import cfunc, njit, prange, types
from numba.extending import overload

from phi_rnn import blas
from phi_rnn.blas import NO_TRANS, ROW_MAJOR, STEP_ROWS, TRANS
from phi_rnn.errors import UsageError

NATIVE_FEATURES = ("avx512_bf16", "amx_bf16")
# Bits of oneDNN's dnnl_cpu_isa_t (dnnl_get_effective_cpu_isa) that each feature sets: the
# instruction sets its kernels may use, after ONEDNN_MAX_CPU_ISA.
_DNNL_ISA_BITS = {"avx512_bf16": 0x80, "amx_bf16": 0x800}
_ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"


def cpu_flags():
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiled_features():
    """The CPU features numba compiles for, as LLVM names them ('+avx512bf16', '+amx-tile',
    ...): the host's unless numba is told another CPU (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES)."""
    from numba.core.registry import cpu_target
    features = getattr(cpu_target.target_context.codegen(), "_tm_features", None)
    if features is None:  # a numba without the attribute: the host's features
        from llvmlite import binding
        features = binding.get_host_cpu_features().flatten()
    return set(features.split(","))


def native_features():
    """The native bfloat16 features (of NATIVE_FEATURES) this CPU has and oneDNN may use."""
    flags = cpu_flags()
    isa = blas._onednn.dnnl_get_effective_cpu_isa() if blas._onednn else None
    return tuple(f for f in NATIVE_FEATURES if f in flags and (isa is None or isa & _DNNL_ISA_BITS[f]))


def refusal():
    """Why --precision bf16 cannot run here: one line."""
    text = "--precision bf16 needs a CPU with native bfloat16 (avx512_bf16 or amx_bf16); this CPU has neither"
    hidden = [f for f in NATIVE_FEATURES if f in cpu_flags()]
    if hidden:
        cap = os.environ.get(_ISA_CAP_ENV)
        hider = f"{_ISA_CAP_ENV}={cap} hides" if cap else "oneDNN cannot use"
        text += f" ({hider} its {' and '.join(hidden)})"
    return text


def require_native():
    """Raise UsageError(refusal()) unless this CPU runs bfloat16 natively."""
    if not native_features():
        raise UsageError(refusal())


# ---------------------------------------------------------------- conversions

_opts = dict(cache=True, error_model="numpy")
_SIGN_MASK, _EXPONENT_ALL = np.uint32(0x7FFFFFFF), np.uint32(0x7F800000)
_ROUND_BIAS, _QUIET = np.uint32(0x7FFF), np.uint32(0x40)
_SIXTEEN, _ONE = np.uint32(16), np.uint32(1)


@njit(**_opts)
def bf16_bits(value):
    """The bfloat16 nearest to float32 `value` (ties to even), as its uint16 bits."""
    bits = np.float32(value).view(np.uint32)
    upper = np.uint32(bits >> _SIXTEEN)  # numba widens uint32 arithmetic to 64 bits: kept to 32
    # Adding 0x7fff plus the kept part's lowest bit carries into it exactly when the dropped
    # half is above one half, or one half and the kept part odd; a carry out of the mantissa
    # raises the exponent, up to infinity.
    rounded = np.uint32(np.uint32(bits + _ROUND_BIAS + (upper & _ONE)) >> _SIXTEEN)
    is_nan = (bits & _SIGN_MASK) > _EXPONENT_ALL
    return np.uint16(np.uint32(upper | _QUIET) if is_nan else rounded)


@njit(**_opts)
def bf16_value(bits):
    """The float32 that bfloat16 bits `bits` stand for (exact)."""
    return np.uint32(np.uint32(bits) << _SIXTEEN).view(np.float32)


ROUND_CHUNK = 4096  # values per parallel task of round_into and amx.round_and_tile


@njit(parallel=True, **_opts)
def round_into(values, out):
    """out[i] = bf16_bits(values[i]): float32 values into a uint16 array of the same shape,
    both contiguous, in parallel."""
    src = values.reshape(values.size)
    dst = out.reshape(out.size)
    for chunk in prange((src.shape[0] + ROUND_CHUNK - 1) // ROUND_CHUNK):
        start = chunk * ROUND_CHUNK
        stop = min(start + ROUND_CHUNK, src.shape[0])
        round_range(src[start:stop], dst[start:stop])


@njit(**_opts)
def round_range(src, dst):
    """dst[i] = bf16_bits(src[i]) for the values of src (1-d)."""
    for i in range(src.shape[0]):
        dst[i] = bf16_bits(src[i])


def as_bits(value):
    """bfloat16 bits as they are, or a float32 rounded to them (compiled code only)."""
    raise NotImplementedError


@overload(as_bits, jit_options=_opts)
def _as_bits_impl(value):
    if value == types.uint16:
        return lambda value: value
    return lambda value: bf16_bits(value)


@njit(**_opts)
def widen_into(bits, out):
    """out[i] = bf16_value(bits[i]): a uint16 array of bfloat16 into float32 of the same
    shape, both contiguous."""
    src = bits.reshape(bits.size)
    dst = out.reshape(out.size)
    for i in range(src.shape[0]):
        dst[i] = bf16_value(src[i])


def to_bf16(values):
    """A new uint16 array of the bfloat16s nearest to `values` (any float array)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty(values.shape, np.uint16)
    round_into(values, out)
    return out


def to_float32(bits):
    """A new float32 array of the values of bfloat16 `bits` (a uint16 array)."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    out = np.empty(bits.shape, np.float32)
    widen_into(bits, out)
    return out


# ---------------------------------------------------------------- the GEMM

_i32, _i64, _f32, _ptr = types.int32, types.int64, types.float32, types.intp
_GEMM_ARGS = (_i32, _i32, _i32, _i32, _i32, _i32, _f32, _ptr, _i32, _ptr, _i32, _f32, _ptr, _i32)
# void cblas_gemm_bf16bf16f32(layout, transa, transb, m, n, k, alpha, const MKL_BF16 *a, lda,
# const MKL_BF16 *b, ldb, beta, float *c, ldc)
_mkl_gemm = types.ExternalFunction("phi_rnn_mkl_gemm_bf16", types.void(*_GEMM_ARGS))
# dnnl_status_t dnnl_gemm_bf16bf16f32(char transa, char transb, dim_t m, n, k, float alpha,
# const bfloat16 *a, dim_t lda, const bfloat16 *b, dim_t ldb, float beta, float *c, dim_t ldc):
# row-major like dnnl_sgemm, 0 = done.
_onednn_gemm = types.ExternalFunction("phi_rnn_onednn_gemm_bf16", types.int32(
    types.int8, types.int8, _i64, _i64, _i64, _f32, _ptr, _i64, _ptr, _i64, _f32, _ptr, _i64))
_DNNL_T, _DNNL_N = np.int8(ord("T")), np.int8(ord("N"))

_mkl_address = blas._address(blas._mkl, "cblas_gemm_bf16bf16f32")
binding.add_symbol("phi_rnn_mkl_gemm_bf16", _mkl_address)
# Without oneDNN its name is bound to MKL's function: never called (set_backend refuses
# "onednn"), but the dispatcher must link.
binding.add_symbol("phi_rnn_onednn_gemm_bf16",
                   blas._address(blas._onednn, "dnnl_gemm_bf16bf16f32") if blas._onednn else _mkl_address)

BACKENDS = ("onednn", "mkl")
_CODES = {"mkl": 0, "onednn": 1}
# The library codes the dispatcher reads at every call: per-step products in the low byte,
# whole-sequence ones in the next.
_choice = ctypes.c_int32(0)
binding.add_symbol("phi_rnn_gemm_bf16_choice", ctypes.addressof(_choice))
_read_choice = blas._word_reader("phi_rnn_gemm_bf16_choice")


@cfunc(types.void(*_GEMM_ARGS), cache=True)
def _dispatch_gemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """The bfloat16 GEMM on the chosen library (module docstring); a, b, c are addresses."""
    choice = _read_choice()
    code = choice & 255 if m < STEP_ROWS and trans_a == NO_TRANS else choice >> 8
    if code == 1 and layout == ROW_MAJOR:
        if _onednn_gemm(_DNNL_T if trans_a == TRANS else _DNNL_N, _DNNL_T if trans_b == TRANS else _DNNL_N,
                        m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0:
            return
    _mkl_gemm(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


binding.add_symbol("phi_rnn_gemm_bf16", _dispatch_gemm.address)
gemm = types.ExternalFunction("phi_rnn_gemm_bf16", types.void(*_GEMM_ARGS))

_backend, _reason = "onednn", ""


def available():
    """The bfloat16 GEMM libraries this process can run, in BACKENDS order."""
    return tuple(name for name in BACKENDS if name == "mkl" or blas._onednn is not None)


def libraries(name):
    """The (per-step, whole-sequence) libraries of backend `name`: one library for both, or
    "step+sequence" such as "mkl+onednn"."""
    parts = name.split("+")
    if len(parts) > 2 or not all(part in BACKENDS for part in parts):
        raise ValueError(f"unknown bfloat16 GEMM backend {name!r} (choose from {', '.join(BACKENDS)}, "
                         "or per-step+whole-sequence libraries such as mkl+onednn)")
    return parts[0], parts[-1]


def set_backend(name, reason=""):
    """Run the bfloat16 GEMMs on `name` from now on (also in kernels compiled before);
    `reason` is what describe_backend says."""
    global _backend, _reason
    step, sequence = libraries(name)
    for library in (step, sequence):
        if library not in available():
            raise ValueError(blas.ONEDNN_MISSING)
    _choice.value = _CODES[step] | _CODES[sequence] << 8
    _backend, _reason = name, reason


def backend():
    return _backend


def describe_backend():
    """The bfloat16 GEMM libraries, per kind of product, and why they were chosen."""
    step, sequence = libraries(_backend)
    names = {library: f"{library} {blas.library_version(library)}" for library in (step, sequence)}
    text = names[step] if step == sequence else \
        f"{names[step]} for the per-step products, {names[sequence]} for the whole-sequence ones"
    return f"{_backend}: {text}; {_reason}" if _reason else f"{_backend}: {text}"


@contextlib.contextmanager
def using(name):
    """Run the bfloat16 GEMMs on `name` inside the block, then on the backend before."""
    chosen, reason = _backend, _reason
    set_backend(name)
    try:
        yield
    finally:
        set_backend(chosen, reason)


@njit(cache=True)
def gemm_arrays(trans_a, trans_b, alpha, a, b, beta, c):
    """c (M, N) = alpha * op(a) @ op(b) + beta * c through `gemm`: a and b uint16 arrays of
    bfloat16, c float32, each 2-d with contiguous rows."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    gemm(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS, m, n, k, np.float32(alpha),
         a.ctypes.data, a.strides[0] // 2, b.ctypes.data, b.strides[0] // 2, np.float32(beta), c.ctypes.data,
         c.strides[0] // 4)


# ---------------------------------------------------------------- weights packed once

# MKL can lay a B operand out for its kernels once (the weights, once per update) and then
# run every product with it without repacking it per call: what a per-step product, small
# next to the weights it multiplies, otherwise spends much of its time on.
PACKED = 151  # CBLAS_TRANSPOSE for an operand laid out by pack_into
_B_MATRIX = 162  # CBLAS_IDENTIFIER: pack B
_mkl_pack = types.ExternalFunction("phi_rnn_mkl_pack_bf16", types.void(
    _i32, _i32, _i32, _i32, _i32, _i32, _ptr, _i32, _ptr))
_mkl_compute = types.ExternalFunction("phi_rnn_mkl_compute_bf16", types.void(*_GEMM_ARGS))
binding.add_symbol("phi_rnn_mkl_pack_bf16", blas._address(blas._mkl, "cblas_gemm_bf16bf16f32_pack"))
binding.add_symbol("phi_rnn_mkl_compute_bf16", blas._address(blas._mkl, "cblas_gemm_bf16bf16f32_compute"))
blas._mkl.cblas_gemm_bf16bf16f32_pack_get_size.restype = ctypes.c_size_t


def packed_size(m, n, k):
    """Bytes of a (k, n) B operand packed for products of m rows."""
    return blas._mkl.cblas_gemm_bf16bf16f32_pack_get_size(_B_MATRIX, m, n, k)


def packed_operand(m, n, k):
    """A buffer for pack_into: a B operand of (k, n) for products of m rows."""
    return np.empty(packed_size(m, n, k), np.uint8)


@njit(cache=True)
def pack_into(trans_b, b, m, packed):
    """Lay out op(b) (bfloat16, (k, n), 2-d with contiguous rows) into `packed`
    (packed_operand(m, n, k)) for gemm_packed_arrays' products of m rows."""
    k, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    _mkl_pack(ROW_MAJOR, _B_MATRIX, TRANS if trans_b else NO_TRANS, m, n, k, b.ctypes.data, b.strides[0] // 2,
              packed.ctypes.data)


@njit(cache=True)
def gemm_packed_arrays(trans_a, alpha, a, packed, beta, c):
    """c (M, N) = alpha * op(a) @ B + beta * c, B packed by pack_into; on MKL, on the calling
    thread's MKL thread count."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    _mkl_compute(ROW_MAJOR, TRANS if trans_a else NO_TRANS, PACKED, m, n, k, np.float32(alpha), a.ctypes.data,
                 a.strides[0] // 2, packed.ctypes.data, n, np.float32(beta), c.ctypes.data, c.strides[0] // 4)


def default_backend():
    """The library until one is measured (gemm_choice.use_default("bf16"), which bfloat16
    training and its benchmarks run): MKL where the CPU has AMX, whose AMX kernels ran every
    product of a char-rnn iteration sooner than oneDNN's there (bench/bf16_gemm.py);
    elsewhere oneDNN, whose AVX512_BF16 kernels are chosen by instruction set, not CPU vendor."""
    if "amx_bf16" in native_features() or "onednn" not in available():
        return "mkl"
    return "onednn"


set_backend(default_backend())
