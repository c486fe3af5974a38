"""Compiled kernels: vectorised transcendentals, the LSTM, GRU and RNN cells and their
recurrences, the loss, the optimizer and generation. Shapes are in each signature; T
timesteps, B batch rows, H hidden units, V vocabulary, G = 4H / 3H / H gate units. A
layer's activations live in (T*B, G) gate buffers (LSTM blocks i, f, o, g; GRU z, r, c),
stored as blocks of batch rows, time-major inside a block (one block: plain time-major).
A layer's kernels take its weights, activations and gradients as named tuples
(LayerWeights, LayerActivations, LayerGradients, WeightGradients; the decoder's likewise),
generation the whole network's as TransposedWeights and GenerationState; training_passes
picks the serial or the per-block versions once.

Parallel strategy "batch": each thread runs a layer on its own block of batch rows (input
projection, recurrence, weight-gradient partials) with MKL inside set to one thread (numba
and MKL share one OpenMP runtime; nested parallelism is off), which also hands those
products to libxsmm when it is the backend (blas.py), so a timestep needs no barrier and no
activation changes core. Strategy "gemm": one block, a serial recurrence with
MKL-threaded GEMMs, for when batch rows per thread get too few to keep a core busy
(bench/README.md compares the two).

Precision: every GEMM operand has a float32 array and an "operand" array (the *_op fields,
weights given as operands). In float32 they are one array; in bfloat16 (mixed precision)
the operand is a uint16 array of bfloat16 bits, written by to_operand right after the
kernel that produced the float32 values, while they are in cache; gemm runs the bfloat16
product (float32 accumulation and output) when its operands are uint16. Cell arithmetic,
gradients and the loss stay float32. The kernels are compiled once per precision.

Kernels are compiled with error_model='numpy' (Python's error model blocks the loop
vectoriser on division) and never index at an offset inside a hot loop (slice views start
at 0), which the vectoriser also needs.
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from phi_rnn import amx, bf16, bf16_dot, row_cell
from phi_rnn.blas import NO_TRANS, ROW_MAJOR, TRANS, dgemm, set_num_threads_local, sgemm
from phi_rnn.cells import KINDS

_opts = dict(cache=True, error_model="numpy")

F32 = np.float32
ONE = F32(1.0)
ZERO = F32(0.0)
_LOG2E = F32(1.4426950408889634)
_LN2_HI = F32(0.693145751953125)  # ln 2 split so that n * _LN2_HI is exact
_LN2_LO = F32(1.428606765330187e-06)
_EXP_LO = F32(-87.0)
_EXP_HI = F32(88.0)
# e^r on |r| <= ln2/2: degree-6 minimax coefficients (relative error 1.9e-9 in exact
# arithmetic; fitted by Lawson-weighted least squares on Chebyshev nodes)
_P0, _P1, _P2 = F32(1.0000000005541703), F32(1.00000003632326), F32(0.49999992079775435)
_P3, _P4 = F32(0.16666420169566126), F32(0.04166822557715331)
_P5, _P6 = F32(0.008374815828753964), F32(0.0013836845653134014)
_TWO = F32(2.0)
_HALF = F32(0.5)


# ---------------------------------------------------------------- transcendentals
# libm's expf/tanhf are scalar calls the vectoriser cannot touch, and the cells would spend
# more time in them than in their GEMMs. exp(x) = 2^n * e^r with |r| <= ln2/2: a degree-6
# polynomial of e^r, and 2^n built from its exponent bits. Fused multiply-adds ('contract',
# the only fast-math flag) make the cells faster and are slightly more accurate
# (tests/test_kernels.py). These flags stay on the instructions when _exp32 is inlined into
# a kernel. float64 (used by the finite-difference gradient checks)
# takes libm's exact functions instead.

@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _exp32(x):
    x = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _P0 + r * (_P1 + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * _P6)))))
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * scale


def fast_exp(x):
    """exp: vectorisable polynomial for float32, libm for float64 (compiled code only)."""
    raise NotImplementedError


def fast_sigmoid(x):
    """1 / (1 + exp(-x)) through fast_exp (compiled code only)."""
    raise NotImplementedError


def fast_tanh(x):
    """2 / (1 + exp(-2x)) - 1 through fast_exp (compiled code only)."""
    raise NotImplementedError


@overload(fast_exp, jit_options=_opts)
def _fast_exp_impl(x):
    if x == types.float64:
        return lambda x: np.exp(x)
    return lambda x: _exp32(x)


@overload(fast_sigmoid, jit_options=_opts)
def _fast_sigmoid_impl(x):
    if x == types.float64:
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    return lambda x: ONE / (ONE + _exp32(-x))


@overload(fast_tanh, jit_options=_opts)
def _fast_tanh_impl(x):
    if x == types.float64:
        return lambda x: np.tanh(x)
    return lambda x: _TWO / (ONE + _exp32(-_TWO * x)) - ONE


# ---------------------------------------------------------------- GEMM helpers

@njit(cache=True, error_model="numpy")
def _scale_row(out, beta):
    """out *= beta, as BLAS does for C: with beta 0 out is not read (it may hold anything)."""
    if beta == 0:
        out[:] = 0
    else:
        for n in range(out.shape[0]):
            out[n] = beta * out[n]


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _row_times_matrix(a, b, beta, c):
    """c (1, N) = a (1, K) @ b (K, N) + beta * c for a batch of one (text generation): b is
    streamed once, four of its rows per pass over c so that c is loaded and stored a
    quarter as often."""
    x = a[0]
    out = c[0]
    _scale_row(out, beta)
    k4 = b.shape[0] - b.shape[0] % 4
    for k in range(0, k4, 4):
        r0, r1, r2, r3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        for n in range(out.shape[0]):
            out[n] += x0 * r0[n] + x1 * r1[n] + x2 * r2[n] + x3 * r3[n]
    for k in range(k4, b.shape[0]):
        row = b[k]
        xk = x[k]
        for n in range(out.shape[0]):
            out[n] += xk * row[n]


@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _row_times_bf16_matrix(a, b, beta, c):
    """_row_times_matrix with b bfloat16 (uint16) and a float32 rounded to bfloat16 as it is
    read: half the bytes of b streamed per product (generation in bfloat16)."""
    x = a[0]
    out = c[0]
    _scale_row(out, beta)
    k4 = b.shape[0] - b.shape[0] % 4
    for k in range(0, k4, 4):
        r0, r1, r2, r3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        x0, x1 = bf16.bf16_value(bf16.bf16_bits(x[k])), bf16.bf16_value(bf16.bf16_bits(x[k + 1]))
        x2, x3 = bf16.bf16_value(bf16.bf16_bits(x[k + 2])), bf16.bf16_value(bf16.bf16_bits(x[k + 3]))
        for n in range(out.shape[0]):
            out[n] += (x0 * bf16.bf16_value(r0[n]) + x1 * bf16.bf16_value(r1[n])
                       + x2 * bf16.bf16_value(r2[n]) + x3 * bf16.bf16_value(r3[n]))
    for k in range(k4, b.shape[0]):
        row = b[k]
        xk = bf16.bf16_value(bf16.bf16_bits(x[k]))
        for n in range(out.shape[0]):
            out[n] += xk * bf16.bf16_value(row[n])


def _product(trans_a, trans_b, alpha, a, b, beta, c):
    """gemm's product, chosen by the operands' types (compiled code only)."""
    raise NotImplementedError


# A bfloat16 product over fewer than WIDEN_K values of K (the recurrent weights' gradient at
# step 0: h0^T dG over a block's few rows) runs as float32 on its operands widened: the
# library's bfloat16 GEMM costs several times float32's there (bench/README), and the float32
# product of widened bfloat16 values is the same sum of exact products.
WIDEN_K = 16


@njit(**_opts)
def _widened(bits):
    """A new float32 array of bfloat16 `bits` (2-d, contiguous rows)."""
    out = np.empty(bits.shape, np.float32)
    for i in range(bits.shape[0]):
        row, dst = bits[i], out[i]
        for j in range(row.shape[0]):
            dst[j] = bf16.bf16_value(row[j])
    return out


@njit(**_opts)
def _bf16_product(trans_a, trans_b, alpha, a, b, beta, c):
    k = a.shape[0] if trans_a else a.shape[1]
    if k < WIDEN_K:
        _float_gemm(trans_a, trans_b, alpha, _widened(a), _widened(b), beta, c)
    else:
        bf16.gemm_arrays(trans_a, trans_b, alpha, a, b, beta, c)


@overload(_product, jit_options=_opts)
def _product_impl(trans_a, trans_b, alpha, a, b, beta, c):
    if b.dtype == types.uint16 and a.dtype == types.uint16:
        return lambda trans_a, trans_b, alpha, a, b, beta, c: _bf16_product(trans_a, trans_b, alpha, a, b, beta, c)
    if b.dtype == types.uint32:  # a batch of one on bfloat16 pairs (generation: bf16_dot.row_product)
        def row_times_pairs(trans_a, trans_b, alpha, a, b, beta, c):
            bf16_dot.row_product(a, b, np.float32(beta), c)
        return row_times_pairs
    if b.dtype == types.uint16:  # a batch of one (generation): a float32 row, rounded as read
        def row_times_bf16(trans_a, trans_b, alpha, a, b, beta, c):
            _row_times_bf16_matrix(a, b, np.float32(beta), c)
        return row_times_bf16
    return lambda trans_a, trans_b, alpha, a, b, beta, c: _float_gemm(trans_a, trans_b, alpha, a, b, beta, c)


@njit(**_opts)
def gemm(trans_a, trans_b, alpha, a, b, beta, c):
    """c (M, N) = alpha * op(a) @ op(b) + beta * c; 2-d arrays with contiguous rows, float32
    (sgemm), float64 (dgemm, for the gradient checks) or bfloat16 operands (uint16) with c
    float32. A float32 a with a bfloat16 b is a batch of one, a (1, K) @ b (K, N): b uint16,
    or uint32 holding b's rows in pairs (bf16_dot.pair_rows, (ceil(K/2), N): vdpbf16ps)."""
    _product(trans_a, trans_b, alpha, a, b, beta, c)


@njit(**_opts)
def _float_gemm(trans_a, trans_b, alpha, a, b, beta, c):
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    ta = TRANS if trans_a else NO_TRANS
    tb = TRANS if trans_b else NO_TRANS
    if c.itemsize == 8:
        dgemm(ROW_MAJOR, ta, tb, m, n, k, np.float64(alpha), a.ctypes.data, a.strides[0] // 8,
              b.ctypes.data, b.strides[0] // 8, np.float64(beta), c.ctypes.data, c.strides[0] // 8)
    elif m == 1 and not trans_a and not trans_b and alpha == 1:
        _row_times_matrix(a, b, np.float32(beta), c)
    else:
        sgemm(ROW_MAJOR, ta, tb, m, n, k, np.float32(alpha), a.ctypes.data, a.strides[0] // 4,
              b.ctypes.data, b.strides[0] // 4, np.float32(beta), c.ctypes.data, c.strides[0] // 4)


@njit(parallel=True, **_opts)
def multiply(a, b, out):
    """out = a * b elementwise over 2-d arrays (dropout masks); out may be a bfloat16 operand
    (uint16: the products rounded)."""
    for r in prange(a.shape[0]):
        ar = a[r]
        br = b[r]
        o = out[r]
        for j in range(ar.shape[0]):
            store(o, j, ar[j] * br[j])


def to_operand(values, operand):
    """operand = values as a GEMM operand, both 2-d of one shape: the bfloat16 bits of each
    value (round to nearest even) when operand is uint16; in float32 operand is values
    itself and nothing is done (compiled code only)."""
    raise NotImplementedError


@overload(to_operand, jit_options=_opts)
def _to_operand_impl(values, operand):
    if operand.dtype != types.uint16:
        return lambda values, operand: None

    def round_rows(values, operand):
        for r in range(values.shape[0]):
            src = values[r]
            dst = operand[r]
            for j in range(src.shape[0]):
                dst[j] = bf16.bf16_bits(src[j])
    return round_rows


def store(row, j, value):
    """row[j] = value, rounded to bfloat16 bits where row is uint16 (compiled code only)."""
    raise NotImplementedError


@overload(store, jit_options=_opts)
def _store_impl(row, j, value):
    if row.dtype == types.uint16:
        def store_bits(row, j, value):
            row[j] = bf16.bf16_bits(value)
        return store_bits

    def store_value(row, j, value):
        row[j] = value
    return store_value


# ---------------------------------------------------------------- LSTM cell

@njit(**_opts)
def lstm_cell_forward(gates, bias, c_prev, c, tanh_c, h):
    """gates (nb, 4H): pre-activations without bias in, activations i, f, o, g out;
    bias (4H) = b_ih + b_hh. c_prev (nb, H) -> c = f*c_prev + i*g, tanh_c, h = o*tanh(c)."""
    H = c.shape[1]
    bi = bias[0:H]
    bf = bias[H:2 * H]
    bo = bias[2 * H:3 * H]
    bg = bias[3 * H:4 * H]
    for b in range(gates.shape[0]):
        gi = gates[b, 0:H]
        gf = gates[b, H:2 * H]
        go = gates[b, 2 * H:3 * H]
        gg = gates[b, 3 * H:4 * H]
        cp = c_prev[b]
        cb = c[b]
        tb = tanh_c[b]
        hb = h[b]
        for j in range(H):
            i = fast_sigmoid(gi[j] + bi[j])
            f = fast_sigmoid(gf[j] + bf[j])
            o = fast_sigmoid(go[j] + bo[j])
            g = fast_tanh(gg[j] + bg[j])
            gi[j] = i
            gf[j] = f
            go[j] = o
            gg[j] = g
            cv = f * cp[j] + i * g
            tv = fast_tanh(cv)
            cb[j] = cv
            tb[j] = tv
            hb[j] = o * tv


@njit(**_opts)
def lstm_cell_backward(gates, c_prev, tanh_c, dh_out, dh, dc):
    """gates (nb, 4H): activations in, pre-activation gradients out.
    dh_out (nb, H): gradient of the step's output from above; dh (nb, H): gradient from the
    next step (read); dc (nb, H): gradient of c from the next step in, of c_prev out."""
    H = c_prev.shape[1]
    for b in range(gates.shape[0]):
        gi = gates[b, 0:H]
        gf = gates[b, H:2 * H]
        go = gates[b, 2 * H:3 * H]
        gg = gates[b, 3 * H:4 * H]
        cp = c_prev[b]
        tb = tanh_c[b]
        dob = dh_out[b]
        dhb = dh[b]
        dcb = dc[b]
        for j in range(H):
            i = gi[j]
            f = gf[j]
            o = go[j]
            g = gg[j]
            t = tb[j]
            dht = dob[j] + dhb[j]
            dct = dcb[j] + dht * o * (ONE - t * t)
            gi[j] = dct * g * i * (ONE - i)
            gf[j] = dct * cp[j] * f * (ONE - f)
            go[j] = dht * t * o * (ONE - o)
            gg[j] = dct * i * (ONE - g * g)
            dcb[j] = dct * f


# ---------------------------------------------------------------- a layer's named state
# A layer's arrays travel as namedtuples (numba compiles them as structs of arrays), so that
# arrays of one shape (hs, cs, aux, d_out) cannot be swapped by position. Rows: (T*B, .)
# buffers hold blocks of batch rows, time-major inside a block (the layout above).

LayerWeights = namedtuple("LayerWeights", ["w_ih_t", "w_hh_t", "bias", "w_ih", "w_hh", "w_hh_t_packed",
                                           "w_hh_packed", "w_ih_t_packed"])
LayerWeights.__doc__ = """One layer's weights, G = gate units, H_in = V (first layer) or H.
w_ih_t (H_in, G), w_hh_t (H, G): transposed for the forward, so that every product is A @ B,
the form libxsmm runs (blas.py); the first layer's w_ih_t is the one-hot table, gathered by
token. bias (G) = b_ih + b_hh. w_ih (G, H_in), w_hh (G, H): as stored, for the backward.
w_hh_t_packed, w_hh_packed: w_hh_t and w_hh laid out for the per-step products (LSTM in
bfloat16: AMX tiles, amx.tile_into, or MKL's format, bf16.pack_into), or empty: the per-step
products then run on gemm. w_ih_t_packed: an upper layer's w_ih_t as AMX tiles, when each
step computes its gates from its input and h in one tile pass (no input projection over all
steps first), else empty."""

LayerActivations = namedtuple("LayerActivations", ["x", "gates", "hs", "cs", "aux", "h0", "c0", "h_last",
                                                   "c_last", "gates_op", "hs_op", "aux_op", "h0_op"])
LayerActivations.__doc__ = """One layer's activations. x (T*B, H_in): its input, the outputs of the
layer below after dropout (the first layer reads tokens instead: its x is empty and never
read); gates (T*B, G): activations (LSTM i, f, o, g; GRU z, r, c); hs, cs, aux (T*B, H): h,
c (LSTM) and tanh(c) (LSTM) / r*h (GRU) after each step; h0, c0 (B, H): the state before
the first step; h_last, c_last (B, H): after the last (c_last = c0 for GRU and RNN).
x is a GEMM operand only (bfloat16 in bfloat16); gates_op, hs_op, aux_op, h0_op: the GEMM
operands of gates (their gradients, in backward), hs, aux (GRU) and h0 (the same arrays in
float32; aux_op is scratch for LSTM and RNN)."""

LayerGradients = namedtuple("LayerGradients", ["d_out", "dh", "dc", "d_rh"])
LayerGradients.__doc__ = """d_out (T*B, H): the gradient of the layer's outputs in; of its input x
out (above the first layer; the same rows, each read before it is written); dh, dc (B, H):
scratch for the recurrent gradients of h and c (LSTM); d_rh (B, H): scratch for the
gradient of r*h (GRU)."""

WeightGradients = namedtuple("WeightGradients", ["d_bias", "d_w_ih_t", "d_w_hh_t"])
WeightGradients.__doc__ = """One block's partial weight gradients (the *_blocks kernels take them
with a leading block axis): d_bias (G), d_w_ih_t (H_in, G), d_w_hh_t (H, G). Transposed,
x^T dG: MKL runs that form faster than dG^T x at these shapes (bench/README);
reduce_parts_transposed sums the blocks and turns them."""

Steps = namedtuple("Steps", ["gates", "hs", "cs", "aux", "h0", "c0", "gates_op", "hs_op", "aux_op", "h0_op"])
Steps.__doc__ = """A block's activations viewed per step: gates, gates_op (T, nb, G); hs, cs, aux,
hs_op, aux_op (T, nb, H); h0, c0, h0_op (nb, H)."""


@njit(**_opts)
def _steps(a, T):
    nb, H = a.h0.shape
    G = a.gates.shape[1]
    return Steps(a.gates.reshape((T, nb, G)), a.hs.reshape((T, nb, H)), a.cs.reshape((T, nb, H)),
                 a.aux.reshape((T, nb, H)), a.h0, a.c0, a.gates_op.reshape((T, nb, G)),
                 a.hs_op.reshape((T, nb, H)), a.aux_op.reshape((T, nb, H)), a.h0_op)


# ---------------------------------------------------------------- recurrences
# One layer over all T steps for a block of nb batch rows. The first layer's one-hot input
# projection is a row gather done here, per step, while the rows are hot in cache (w.w_ih_t
# is the table, `tokens` (T, nb) the block's columns); upper layers arrive with their input
# projection (one GEMM over all steps) already in the gates.

@njit(**_opts)
def gather_step(gates_t, table, tokens_t):
    """gates_t (nb, G) = table[tokens_t] (nb): the one-hot input projection of one step."""
    for b in range(gates_t.shape[0]):
        src = table[tokens_t[b]]
        dst = gates_t[b]
        for j in range(dst.shape[0]):
            dst[j] = src[j]


@njit(**_opts)
def accumulate_step(d_gates_t, tokens_t, first, d_bias, d_table):
    """d_bias (G) += column sums of d_gates_t (nb, G); for the first layer also d_table (V, G)
    rows tokens_t += rows: the bias and one-hot input weight gradients, accumulated while
    d_gates_t is in cache."""
    for b in range(d_gates_t.shape[0]):
        src = d_gates_t[b]
        for j in range(src.shape[0]):
            d_bias[j] += src[j]
        if first:
            dst = d_table[tokens_t[b]]
            for j in range(src.shape[0]):
                dst[j] += src[j]


@njit(**_opts)
def lstm_step_forward(g, bias, w_hh_t, h_prev, c_prev, h, c, tanh_c):
    """One step for rows nb: g (nb, 4H) input projection in, activations out; w_hh_t (H, 4H)
    the recurrent weights transposed; h_prev, c_prev (nb, H) in; h, c, tanh_c (nb, H) out."""
    gemm(False, False, ONE, h_prev, w_hh_t, ONE, g)
    lstm_cell_forward(g, bias, c_prev, c, tanh_c, h)


def packed_product(a, packed, beta, c):
    """c = a @ B + beta * c on B's packed copy (bfloat16): AMX tiles (amx.tile_into's uint32
    tiles) or MKL's packed format (bf16.pack_into's bytes) (compiled code only)."""
    raise NotImplementedError


@overload(packed_product, jit_options=_opts)
def _packed_product_impl(a, packed, beta, c):
    if packed.dtype == types.uint32:
        return lambda a, packed, beta, c: amx.tile_product(a, packed, beta, c)
    return lambda a, packed, beta, c: bf16.gemm_packed_arrays(False, 1.0, a, packed, beta, c)


def packed_product_sum(a, packed_a, b, packed_b, c):
    """c = a @ A + b @ B on AMX tiles (compiled code only)."""
    raise NotImplementedError


@overload(packed_product_sum, jit_options=_opts)
def _packed_product_sum_impl(a, packed_a, b, packed_b, c):
    if packed_a.dtype == types.uint32:
        return lambda a, packed_a, b, packed_b, c: amx.tile_product_sum(a, packed_a, b, packed_b, c)

    def not_tiles(a, packed_a, b, packed_b, c):
        raise ValueError("packed_product_sum: the weights are not AMX tiles")
    return not_tiles


@njit(**_opts)
def recurrent_product(a, b, packed, beta, c):
    """c = a @ b + beta * c, a per-step product: on b's packed copy (bfloat16: AMX or MKL)
    when `packed` is not empty, else through gemm."""
    if packed.size > 0:
        packed_product(a, packed, beta, c)
    else:
        gemm(False, False, ONE, a, b, beta, c)


@njit(**_opts)
def input_per_step(first, w, nb):
    """Whether a layer's input projection is done step by step, with the recurrent product in
    one tile pass (an upper LSTM layer whose w_ih_t has AMX tiles: model.packed_step_weights
    fills w_ih_t_packed for those only), instead of over all steps first (input_projection).
    Per step only with a full tile of rows: with fewer, streaming W_ih from L2 at every step
    costs more than the pass over the gates it saves (bench/README)."""
    return not first and w.w_ih_t_packed.size > 0 and nb >= amx.TILE_ROWS


@njit(**_opts)
def input_projection(x, w, gates):
    """gates (rows, G) = x (rows, H_in) @ W_ih^T for all steps at once: on W_ih's AMX tiles
    where it has some (model.packed_step_weights), else through gemm."""
    if w.w_ih_t_packed.size > 0:
        packed_product(x, w.w_ih_t_packed, ZERO, gates)
    else:
        gemm(False, False, ONE, x, w.w_ih_t, ZERO, gates)


@njit(**_opts)
def lstm_recurrence_forward(first, tokens, w, s, x):
    """All steps of a block: s.gates (T, nb, 4H) input projection in (unless `first`: then
    gathered here; or, with w.w_ih_t_packed, computed here from x (T*nb, H_in) with the
    recurrent product in one tile pass), activations out; s.hs, s.cs, s.aux = tanh(c) out."""
    nb = s.h0.shape[0]
    per_step_input = input_per_step(first, w, nb)
    for t in range(s.gates.shape[0]):
        g = s.gates[t]
        h_prev = s.h0_op if t == 0 else s.hs_op[t - 1]
        if first:
            gather_step(g, w.w_ih_t, tokens[t])
        # lstm_step_forward, its product on the packed weights where there are some
        if per_step_input:
            packed_product_sum(x[t * nb:(t + 1) * nb], w.w_ih_t_packed, h_prev, w.w_hh_t_packed, g)
        else:
            recurrent_product(h_prev, w.w_hh_t, w.w_hh_t_packed, ONE, g)
        lstm_cell_forward(g, w.bias, s.c0 if t == 0 else s.cs[t - 1], s.cs[t], s.aux[t], s.hs[t])
        to_operand(s.hs[t], s.hs_op[t])


@njit(**_opts)
def lstm_recurrence_backward(first, tokens, w, s, d_out, dh, dc, dw):
    """The block's steps T-1..0. s.gates: activations in, pre-activation gradients out;
    d_out (T, nb, H): gradient of each step's output from above; dh, dc (nb, H): the
    recurrent gradients (zeroed by the caller: truncated BPTT); dw.d_bias and (first layer)
    dw.d_w_ih_t, the one-hot table's gradient, get this block's partial gradients."""
    for t in range(s.gates.shape[0] - 1, -1, -1):
        g = s.gates[t]
        c_prev = s.c0 if t == 0 else s.cs[t - 1]
        lstm_cell_backward(g, c_prev, s.aux[t], d_out[t], dh, dc)
        to_operand(g, s.gates_op[t])
        accumulate_step(g, tokens[t], first, dw.d_bias, dw.d_w_ih_t)
        if t > 0:  # the initial state is a constant: no gradient flows into it
            recurrent_product(s.gates_op[t], w.w_hh, w.w_hh_packed, ZERO, dh)


# ---------------------------------------------------------------- GRU (char-rnn's GRU.lua)
# Blocks z (update), r (reset), c (candidate): z = sig(x Wz + h Uz + b), r = sig(x Wr + h Ur + b),
# c = tanh(x Wc + (r*h) Uc + b), h' = z*c + (1-z)*h. The reset gate acts before Uc, so a step
# is two dependent GEMMs: [z r] from h, then c from r*h (kept in `rh` for the gradient of Uc).

@njit(**_opts)
def gru_gates_forward(gates, bias, h_prev, rh):
    """gates (nb, 3H): z and r pre-activations in (no bias), activations out; rh = r*h_prev."""
    H = h_prev.shape[1]
    bz = bias[0:H]
    br = bias[H:2 * H]
    for b in range(gates.shape[0]):
        gz = gates[b, 0:H]
        gr = gates[b, H:2 * H]
        hp = h_prev[b]
        rb = rh[b]
        for j in range(H):
            z = fast_sigmoid(gz[j] + bz[j])
            r = fast_sigmoid(gr[j] + br[j])
            gz[j] = z
            gr[j] = r
            rb[j] = r * hp[j]


@njit(**_opts)
def gru_output_forward(gates, bias, h_prev, h):
    """gates (nb, 3H): candidate pre-activation in (block 2, no bias), tanh out;
    h = z*c + (1-z)*h_prev."""
    H = h_prev.shape[1]
    bc = bias[2 * H:3 * H]
    for b in range(gates.shape[0]):
        gz = gates[b, 0:H]
        gc = gates[b, 2 * H:3 * H]
        hp = h_prev[b]
        hb = h[b]
        for j in range(H):
            c = fast_tanh(gc[j] + bc[j])
            gc[j] = c
            z = gz[j]
            hb[j] = z * c + (ONE - z) * hp[j]


@njit(**_opts)
def gru_output_backward(gates, h_prev, dh_out, dh):
    """Through h' = z*c + (1-z)*h: blocks z and c of gates (activations) become pre-activation
    gradients; dh (from the next step) in, the direct part of d(h_prev) out."""
    H = h_prev.shape[1]
    for b in range(gates.shape[0]):
        gz = gates[b, 0:H]
        gc = gates[b, 2 * H:3 * H]
        hp = h_prev[b]
        dob = dh_out[b]
        dhb = dh[b]
        for j in range(H):
            z = gz[j]
            c = gc[j]
            dht = dob[j] + dhb[j]
            gz[j] = dht * (c - hp[j]) * z * (ONE - z)
            gc[j] = dht * z * (ONE - c * c)
            dhb[j] = dht * (ONE - z)


@njit(**_opts)
def gru_reset_backward(gates, h_prev, d_rh, dh):
    """Through rh = r*h: block r of gates becomes its pre-activation gradient; dh += d_rh*r."""
    H = h_prev.shape[1]
    for b in range(gates.shape[0]):
        gr = gates[b, H:2 * H]
        hp = h_prev[b]
        drb = d_rh[b]
        dhb = dh[b]
        for j in range(H):
            r = gr[j]
            gr[j] = drb[j] * hp[j] * r * (ONE - r)
            dhb[j] += drb[j] * r


@njit(**_opts)
def gru_step_forward(g, bias, w_hh_t, h_prev, h_prev_op, h, rh, rh_op):
    """One step for rows nb: g (nb, 3H) input projection in, activations out; w_hh_t (H, 3H);
    h_prev (nb, H) and its GEMM operand h_prev_op in; h, rh = r*h_prev (nb, H) and rh's
    operand rh_op out."""
    H = h_prev.shape[1]
    gemm(False, False, ONE, h_prev_op, w_hh_t[:, 0:2 * H], ONE, g[:, 0:2 * H])
    gru_gates_forward(g, bias, h_prev, rh)
    to_operand(rh, rh_op)
    gemm(False, False, ONE, rh_op, w_hh_t[:, 2 * H:3 * H], ONE, g[:, 2 * H:3 * H])
    gru_output_forward(g, bias, h_prev, h)


@njit(**_opts)
def gru_recurrence_forward(first, tokens, w, s):
    """As lstm_recurrence_forward, for (T, nb, 3H) gates; s.aux = r*h."""
    for t in range(s.gates.shape[0]):
        g = s.gates[t]
        if first:
            gather_step(g, w.w_ih_t, tokens[t])
        if t == 0:
            gru_step_forward(g, w.bias, w.w_hh_t, s.h0, s.h0_op, s.hs[0], s.aux[0], s.aux_op[0])
        else:
            gru_step_forward(g, w.bias, w.w_hh_t, s.hs[t - 1], s.hs_op[t - 1], s.hs[t], s.aux[t], s.aux_op[t])
        to_operand(s.hs[t], s.hs_op[t])


@njit(**_opts)
def gru_recurrence_backward(first, tokens, w, s, d_out, dh, d_rh, dw):
    """As lstm_recurrence_backward; d_rh (nb, H) is scratch for the gradient of r*h."""
    H = s.h0.shape[1]
    for t in range(s.gates.shape[0] - 1, -1, -1):
        g = s.gates[t]
        h_prev = s.h0 if t == 0 else s.hs[t - 1]
        g_op = s.gates_op[t]
        gru_output_backward(g, h_prev, d_out[t], dh)
        to_operand(g[:, 2 * H:3 * H], g_op[:, 2 * H:3 * H])
        gemm(False, False, ONE, g_op[:, 2 * H:3 * H], w.w_hh[2 * H:3 * H], ZERO, d_rh)
        gru_reset_backward(g, h_prev, d_rh, dh)
        to_operand(g[:, 0:2 * H], g_op[:, 0:2 * H])
        accumulate_step(g, tokens[t], first, dw.d_bias, dw.d_w_ih_t)
        if t > 0:
            gemm(False, False, ONE, g_op[:, 0:2 * H], w.w_hh[0:2 * H], ONE, dh)


# ---------------------------------------------------------------- vanilla RNN: h' = tanh(x W + h U + b)

@njit(**_opts)
def rnn_step_forward(g, bias, w_hh_t, h_prev, h):
    """One step for rows nb: g (nb, H) input projection in, h' = tanh(a) out (also in h);
    w_hh_t (H, H) the recurrent weights transposed."""
    gemm(False, False, ONE, h_prev, w_hh_t, ONE, g)
    for b in range(g.shape[0]):
        gb = g[b]
        hb = h[b]
        for j in range(gb.shape[0]):
            a = fast_tanh(gb[j] + bias[j])
            gb[j] = a
            hb[j] = a


@njit(**_opts)
def rnn_recurrence_forward(first, tokens, w, s):
    """As lstm_recurrence_forward, for (T, nb, H) gates holding h' = tanh(a)."""
    for t in range(s.gates.shape[0]):
        g = s.gates[t]
        if first:
            gather_step(g, w.w_ih_t, tokens[t])
        if t == 0:
            rnn_step_forward(g, w.bias, w.w_hh_t, s.h0_op, s.hs[0])
        else:
            rnn_step_forward(g, w.bias, w.w_hh_t, s.hs_op[t - 1], s.hs[t])
        to_operand(s.hs[t], s.hs_op[t])


@njit(**_opts)
def rnn_recurrence_backward(first, tokens, w, s, d_out, dh, dw):
    """As lstm_recurrence_backward, for (T, nb, H) gates holding h' = tanh(a)."""
    for t in range(s.gates.shape[0] - 1, -1, -1):
        g = s.gates[t]
        dho = d_out[t]
        for b in range(g.shape[0]):
            gb = g[b]
            ob = dho[b]
            hb = dh[b]
            for j in range(gb.shape[0]):
                a = gb[j]
                gb[j] = (ob[j] + hb[j]) * (ONE - a * a)
        to_operand(g, s.gates_op[t])
        accumulate_step(g, tokens[t], first, dw.d_bias, dw.d_w_ih_t)
        if t > 0:
            gemm(False, False, ONE, s.gates_op[t], w.w_hh, ZERO, dh)


# ---------------------------------------------------------------- one layer, any cell
LSTM, GRU, RNN = KINDS["lstm"], KINDS["gru"], KINDS["rnn"]


@njit(**_opts)
def layer_forward(kind, first, tokens, b0, w, a):
    """One block of a layer, all T steps: the block's nb batch rows are columns b0.. of tokens
    (T, B), and `a` holds only its rows. Its gates get the input projection, a.x @ w.w_ih_t
    (one GEMM over all steps) or, for the first layer, the table rows of the tokens; then the
    recurrence; then the state after the last step."""
    T = tokens.shape[0]
    nb = a.h0.shape[0]
    to_operand(a.h0, a.h0_op)
    if not first and not input_per_step(first, w, nb):
        input_projection(a.x, w, a.gates)
    s = _steps(a, T)
    block_tokens = tokens[:, b0:b0 + nb]
    if kind == LSTM:
        lstm_recurrence_forward(first, block_tokens, w, s, a.x)
        a.c_last[:] = s.cs[T - 1]
    else:
        if kind == GRU:
            gru_recurrence_forward(first, block_tokens, w, s)
        else:
            rnn_recurrence_forward(first, block_tokens, w, s)
        a.c_last[:] = a.c0
    a.h_last[:] = s.hs[T - 1]


@njit(**_opts)
def layer_backward(kind, first, tokens, b0, w, a, d, dw):
    """The block's backward, all steps: a.gates activations in, pre-activation gradients out;
    d (LayerGradients, the block's rows) and dw (WeightGradients) as documented there."""
    T = tokens.shape[0]
    nb, H = a.h0.shape
    G = a.gates.shape[1]
    d.dh[:] = ZERO  # truncated BPTT: no gradient arrives from beyond the last step
    d.dc[:] = ZERO
    dw.d_bias[:] = ZERO
    if first:
        dw.d_w_ih_t[:] = ZERO  # accumulated row by row; above, one GEMM writes it
    s = _steps(a, T)
    block_tokens = tokens[:, b0:b0 + nb]
    d_out = d.d_out.reshape((T, nb, H))
    if kind == LSTM:
        lstm_recurrence_backward(first, block_tokens, w, s, d_out, d.dh, d.dc, dw)
    elif kind == GRU:
        gru_recurrence_backward(first, block_tokens, w, s, d_out, d.dh, d.d_rh, dw)
    else:
        rnn_recurrence_backward(first, block_tokens, w, s, d_out, d.dh, dw)
    # weight gradients over all steps: the recurrent input is h0 at step 0, then hs[0:T-1]
    hh = 2 * H if kind == GRU else G  # GRU: z, r act on h; the candidate's weights on r*h
    gemm(True, False, ONE, a.h0_op, a.gates_op[:nb, :hh], ZERO, dw.d_w_hh_t[:, :hh])
    gemm(True, False, ONE, a.hs_op[:(T - 1) * nb], a.gates_op[nb:, :hh], ONE, dw.d_w_hh_t[:, :hh])
    if kind == GRU:
        gemm(True, False, ONE, a.aux_op, a.gates_op[:, hh:], ZERO, dw.d_w_hh_t[:, hh:])
    if not first:
        gemm(True, False, ONE, a.x, a.gates_op, ZERO, dw.d_w_ih_t)
        gemm(False, False, ONE, a.gates_op, w.w_ih, ZERO, d.d_out)


# Batch strategy: block p of nparts holds batch rows [p*B/nparts, (p+1)*B/nparts), and every
# (T*B)-row buffer stores the blocks one after another, time-major inside each. A thread then
# runs a layer's input projection, recurrence, weight-gradient partials and input gradient on
# its own contiguous rows with MKL sequential inside (left to its global count it nests):
# no activation cache line is written by one core and read by another.

@njit(**_opts)
def _block_activations(a, T, b0, b1):
    r0, r1 = T * b0, T * b1
    return LayerActivations(a.x[r0:r1], a.gates[r0:r1], a.hs[r0:r1], a.cs[r0:r1], a.aux[r0:r1], a.h0[b0:b1],
                            a.c0[b0:b1], a.h_last[b0:b1], a.c_last[b0:b1], a.gates_op[r0:r1], a.hs_op[r0:r1],
                            a.aux_op[r0:r1], a.h0_op[b0:b1])


@njit(**_opts)
def _block_gradients(d, T, b0, b1):
    return LayerGradients(d.d_out[T * b0:T * b1], d.dh[b0:b1], d.dc[b0:b1], d.d_rh[b0:b1])


@njit(**_opts)
def _part(dw, p):
    return WeightGradients(dw.d_bias[p], dw.d_w_ih_t[p], dw.d_w_hh_t[p])


@njit(parallel=True, **_opts)
def layer_forward_blocks(kind, first, tokens, w, a, nparts):
    """layer_forward for every block, one per thread; `a` holds all B rows."""
    T, B = tokens.shape
    for p in prange(nparts):
        set_num_threads_local(1)
        b0, b1 = p * B // nparts, (p + 1) * B // nparts
        layer_forward(kind, first, tokens, b0, w, _block_activations(a, T, b0, b1))
        set_num_threads_local(0)


@njit(parallel=True, **_opts)
def layer_backward_blocks(kind, first, tokens, w, a, d, dw, nparts):
    """layer_backward for every block; dw's (nparts, ...) arrays get each block's partial
    gradients, summed by reduce_parts(_transposed) in a fixed order."""
    T, B = tokens.shape
    for p in prange(nparts):
        set_num_threads_local(1)
        b0, b1 = p * B // nparts, (p + 1) * B // nparts
        layer_backward(kind, first, tokens, b0, w, _block_activations(a, T, b0, b1),
                       _block_gradients(d, T, b0, b1), _part(dw, p))
        set_num_threads_local(0)


@njit(parallel=True, **_opts)
def reduce_parts(parts, out, nchunks):
    """out (N) = sum over p of parts (P, N), in the order p = 0, 1, ... for every element
    (results do not depend on how the chunks fall on threads)."""
    n = out.shape[0]
    for c in prange(nchunks):
        lo, hi = c * n // nchunks, (c + 1) * n // nchunks
        o = out[lo:hi]
        o[:] = parts[0, lo:hi]
        for p in range(1, parts.shape[0]):
            src = parts[p, lo:hi]
            for j in range(o.shape[0]):
                o[j] += src[j]


_TILE = 16  # parts rows summed together: one cache line of out's row per store run


@njit(parallel=True, **_opts)
def reduce_parts_transposed(parts, out, nchunks):
    """out (C, R) = the sum over p of parts (P, R, C) transposed, in the order p = 0, 1, ...
    Each chunk of out's rows sums a tile of _TILE parts rows over its contiguous run of
    columns, then stores the tile's columns as runs of _TILE along out's rows: stores one
    element down a column of out would each touch a cache line of their own."""
    C, R = out.shape
    for k in prange(nchunks):
        lo, hi = k * C // nchunks, (k + 1) * C // nchunks
        acc = np.empty((_TILE, hi - lo), out.dtype)
        for r0 in range(0, R, _TILE):
            rows = min(_TILE, R - r0)
            for i in range(rows):
                a = acc[i]
                a[:] = parts[0, r0 + i, lo:hi]
                for p in range(1, parts.shape[0]):
                    src = parts[p, r0 + i, lo:hi]
                    for j in range(a.shape[0]):
                        a[j] += src[j]
            for j in range(hi - lo):
                dst = out[lo + j, r0:r0 + rows]
                for i in range(rows):
                    dst[i] = acc[i, j]


# ---------------------------------------------------------------- decoder and loss

DecoderWeights = namedtuple("DecoderWeights", ["w_t", "b", "w"])
DecoderWeights.__doc__ = "w_t (H, V) the weights transposed (forward), b (V), w (V, H) as stored (backward)."

DecoderActivations = namedtuple("DecoderActivations", ["x", "targets", "logits", "row_loss", "logits_op"])
DecoderActivations.__doc__ = """x (R, H): the decoder's input, the top layer's outputs after
dropout (a GEMM operand); targets (R); logits (R, V): the logits, then the gradient of the
loss by them; row_loss (R): each row's NLL; logits_op (R, V): that gradient as a GEMM
operand (logits itself in float32)."""

DecoderGradients = namedtuple("DecoderGradients", ["d_w", "d_b"])
DecoderGradients.__doc__ = "One block's partial gradients d_w (V, H), d_b (V) (a leading block axis for *_blocks)."


@njit(**_opts)
def softmax_nll_row(z, y, grad_scale):
    """z (V): logits in, grad_scale * d(NLL)/d(logits) out for target y; returns the NLL."""
    zy = z[y]
    zmax = z[0]
    for j in range(1, z.shape[0]):
        zmax = max(zmax, z[j])
    for j in range(z.shape[0]):  # apart from the sum: a float sum would keep it scalar
        z[j] = fast_exp(z[j] - zmax)
    total = ZERO
    for j in range(z.shape[0]):
        total += z[j]
    inv = grad_scale / total
    for j in range(z.shape[0]):
        z[j] = z[j] * inv
    z[y] -= grad_scale
    return zmax + np.log(total) - zy


@njit(**_opts)
def decoder_forward(w, a, grad_scale):
    """A block of R rows: logits = x @ w_t + b; row_loss gets each row's NLL (summed by the
    caller in a fixed order) and logits d(loss)/d(logits), where loss = grad_scale * the sum
    of the row NLLs."""
    for r in range(a.logits.shape[0]):
        a.logits[r] = w.b
    gemm(False, False, ONE, a.x, w.w_t, ONE, a.logits)
    for r in range(a.logits.shape[0]):
        a.row_loss[r] = softmax_nll_row(a.logits[r], a.targets[r], grad_scale)
        to_operand(a.logits[r:r + 1], a.logits_op[r:r + 1])


@njit(**_opts)
def decoder_backward(w, a, d_x, dw):
    """A block's decoder gradients from a.logits (holding d(loss)/d(logits)): the partials dw;
    d_x (R, H) = the gradient of the decoder's input."""
    gemm(True, False, ONE, a.logits_op, a.x, ZERO, dw.d_w)
    dw.d_b[:] = ZERO
    for r in range(a.logits.shape[0]):
        row = a.logits[r]
        for j in range(row.shape[0]):
            dw.d_b[j] += row[j]
    gemm(False, False, ONE, a.logits_op, w.w, ZERO, d_x)


@njit(**_opts)
def _block_decoder(a, r0, r1):
    return DecoderActivations(a.x[r0:r1], a.targets[r0:r1], a.logits[r0:r1], a.row_loss[r0:r1],
                              a.logits_op[r0:r1])


@njit(parallel=True, **_opts)
def decoder_forward_blocks(w, a, grad_scale, T, nparts):
    """decoder_forward for every block of T * (batch rows) rows (the layout above)."""
    B = a.logits.shape[0] // T
    for p in prange(nparts):
        set_num_threads_local(1)
        r0, r1 = T * (p * B // nparts), T * ((p + 1) * B // nparts)
        decoder_forward(w, _block_decoder(a, r0, r1), grad_scale)
        set_num_threads_local(0)


@njit(parallel=True, **_opts)
def decoder_backward_blocks(w, a, d_x, dw, T, nparts):
    """decoder_backward for every block; dw's (nparts, ...) arrays get the partials."""
    B = a.logits.shape[0] // T
    for p in prange(nparts):
        set_num_threads_local(1)
        r0, r1 = T * (p * B // nparts), T * ((p + 1) * B // nparts)
        decoder_backward(w, _block_decoder(a, r0, r1), d_x[r0:r1], DecoderGradients(dw.d_w[p], dw.d_b[p]))
        set_num_threads_local(0)


# ---------------------------------------------------------------- serial or parallel, chosen once

Passes = namedtuple("Passes", ["layer_forward", "layer_backward", "decoder_forward", "decoder_backward"])


def training_passes(nparts):
    """The kernels of a training iteration over `nparts` blocks of batch rows, with one
    signature whichever runs them: (kind, first, tokens, w, a), (kind, first, tokens, w, a,
    d, dw), (w, a, grad_scale, T), (w, a, d_x, dw, T); the weight-gradient partials dw with a
    leading block axis. One block runs in the calling thread with MKL threaded (strategy
    gemm, or one thread); more run one per thread (strategy batch)."""
    if nparts == 1:
        return Passes(
            lambda kind, first, tokens, w, a: layer_forward(kind, first, tokens, 0, w, a),
            lambda kind, first, tokens, w, a, d, dw: layer_backward(kind, first, tokens, 0, w, a, d,
                                                                    WeightGradients(*(x[0] for x in dw))),
            lambda w, a, grad_scale, T: decoder_forward(w, a, grad_scale),
            lambda w, a, d_x, dw, T: decoder_backward(w, a, d_x, DecoderGradients(*(x[0] for x in dw))))
    return Passes(
        lambda kind, first, tokens, w, a: layer_forward_blocks(kind, first, tokens, w, a, nparts),
        lambda kind, first, tokens, w, a, d, dw: layer_backward_blocks(kind, first, tokens, w, a, d, dw, nparts),
        lambda w, a, grad_scale, T: decoder_forward_blocks(w, a, grad_scale, T, nparts),
        lambda w, a, d_x, dw, T: decoder_backward_blocks(w, a, d_x, dw, T, nparts))


# ---------------------------------------------------------------- optimizer

@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _sum_of_squares(x):
    """sum(x^2) in float64; reassociated so that it vectorises (the same order every call)."""
    total = 0.0
    for i in range(x.shape[0]):
        total += np.float64(x[i]) * np.float64(x[i])
    return total


@njit(parallel=True, **_opts)
def rmsprop_step(params, grads, ms, lr, alpha, clip, nchunks, sq_grad, sq_param):
    """One RMSprop step over the flat buffers, char-rnn's way: clamp g to [-clip, clip],
    m = alpha*m + (1-alpha)*g^2, p -= lr*g/(sqrt(m)+1e-8). sq_grad/sq_param (nchunks) get the
    per-chunk sums of squares of the clamped gradient and the updated parameters (float64),
    reduced by the caller: a fixed chunking keeps the result independent of thread count."""
    n = params.shape[0]
    lr32 = F32(lr)
    a32 = F32(alpha)
    b32 = ONE - a32
    lo = F32(-clip)
    hi = F32(clip)
    eps = F32(1e-8)
    for c in prange(nchunks):
        i0 = c * n // nchunks
        i1 = (c + 1) * n // nchunks
        p = params[i0:i1]
        g = grads[i0:i1]
        m = ms[i0:i1]
        for i in range(p.shape[0]):  # no sums in this loop: they would keep it scalar
            gi = min(max(g[i], lo), hi)
            g[i] = gi
            mi = a32 * m[i] + b32 * gi * gi
            m[i] = mi
            p[i] = p[i] - lr32 * gi / (np.sqrt(mi) + eps)
        sq_grad[c] = _sum_of_squares(g)
        sq_param[c] = _sum_of_squares(p)


# ---------------------------------------------------------------- generation (batch of one)
# A character is one step of each layer's training step function with B = 1, all layers
# and the decoder in one compiled call. The weights and the state travel as namedtuples, as
# a training layer's do; one weight set per precision, each with the fields of
# TransposedWeights (in bfloat16 the layers' weights are AMX tiles where the CPU has them,
# else uint32 pairs for vdpbf16ps, or uint16 without either; the decoder's pairs or uint16:
# gemm's batch-of-one bfloat16 products stream half the bytes).

TransposedWeights = namedtuple("TransposedWeights", ["w_ih0_t", "w_ih_t", "w_hh_t", "bias", "dec_w_t", "dec_b"])
TransposedWeights.__doc__ = """The whole network's forward weights, stacked by layer and transposed
so that every product is A @ B (the form libxsmm runs, blas.py): w_ih0_t (V, G) the first
layer's one-hot table (gathered by token); w_ih_t (max(L-1, 1), H, G) of layers 1..;
w_hh_t (L, H, G); bias (L, G) = b_ih + b_hh; dec_w_t (H, V); dec_b (V). generation_step
reads them; training's LayerWeights and DecoderWeights are views of them
(model.transposed_weights fills them)."""

GenerationState = namedtuple("GenerationState", ["h", "c", "h_next", "aux", "gates", "logits"])
GenerationState.__doc__ = """A batch of one's state and scratch: h, c (L, 1, H) every layer's h
and c (LSTM; unused otherwise), carried from character to character (the LSTM's cell,
row_cell.lstm_row_cell, updates them in place); h_next (1, H): a GRU's or RNN's step writes
its new h there (the step reads h while it writes), then it is copied into h; aux (1, H),
gates (1, G): a step's scratch as in training; logits (1, V): the prediction of the next
character, carried between calls."""


@njit(**_opts)
def generation_step(kind, token, w, s):
    """Feeds `token` through every layer of w (TransposedWeights) and the decoder: s
    (GenerationState) moves on one character, s.logits gets the prediction of the next. The
    cell's step is chosen here, not in a function of its own: behind a call that LLVM does
    not inline, a character took several percent longer (bench/README)."""
    L = w.w_hh_t.shape[0]
    for layer in range(L):
        h = s.h[layer]
        c = s.c[layer]
        if layer == 0:
            s.gates[0, :] = w.w_ih0_t[token]  # the one-hot input projection
        else:
            _row_product(s.h[layer - 1], w.w_ih_t[layer - 1], ZERO, s.gates)
        if kind == LSTM:  # the state in place: the cell reads each unit before it writes it
            _row_product(h, w.w_hh_t[layer], ONE, s.gates)
            row_cell.lstm_row_cell(s.gates, w.bias[layer], c, c, h)
            continue
        if kind == GRU:
            gru_step_forward(s.gates, w.bias[layer], w.w_hh_t[layer], h, h, s.h_next, s.aux, s.aux)
        else:
            rnn_step_forward(s.gates, w.bias[layer], w.w_hh_t[layer], h, s.h_next)
        h[:] = s.h_next
    s.logits[0, :] = w.dec_b
    gemm(False, False, ONE, s.h[L - 1], w.dec_w_t, ONE, s.logits)


@njit(**_opts)
def choose(logits, temperature, argmax, u, probs):
    """Next token from logits (V): argmax, or the inverse-CDF draw with uniform u from
    softmax(logits / temperature); probs (V) is scratch for the unnormalised weights (a
    loop of its own, so that the float32 exp vectorises)."""
    best = np.argmax(logits)
    if argmax:
        return best
    top = logits[best]
    inv_t = ONE / np.float32(temperature)
    for k in range(logits.shape[0]):
        probs[k] = fast_exp((logits[k] - top) * inv_t)
    total = 0.0
    for k in range(probs.shape[0]):
        total += probs[k]
    threshold = u * total
    acc = 0.0
    for k in range(probs.shape[0]):
        acc += probs[k]
        if acc > threshold:
            return k
    return probs.shape[0] - 1


@njit(**_opts)
def prime(kind, text, w, s):
    """Feeds the tokens of `text` through generation_step."""
    _configure_tiles(w)
    for k in range(text.shape[0]):
        generation_step(kind, text[k], w, s)
    _release_tiles(w)


@njit(**_opts)
def generate(kind, uniforms, temperature, argmax, w, s, out):
    """out[k] = the k-th sampled token (choose with uniforms[k]), each fed back in through
    generation_step; s.logits carries the prediction between calls."""
    probs = np.empty(s.logits.shape[1], np.float32)
    _configure_tiles(w)
    for k in range(out.shape[0]):
        token = choose(s.logits[0], temperature, argmax, uniforms[k], probs)
        out[k] = token
        generation_step(kind, token, w, s)
    _release_tiles(w)


def _row_product(a, b, beta, c):
    """c = a @ b + beta * c in generation_step: on AMX tiles (4-d uint32 b) inside prime's and
    generate's tile configuration (amx.row_product_configured), else gemm (compiled code only)."""
    raise NotImplementedError


@overload(_row_product, jit_options=_opts)
def _row_product_impl(a, b, beta, c):
    if b.dtype == types.uint32 and b.ndim == 4:
        return lambda a, b, beta, c: amx.row_product_configured(a, b, beta, c)
    return lambda a, b, beta, c: gemm(False, False, ONE, a, b, beta, c)


def _tiled(weights_type):
    """Whether generation's weights (the TransposedWeights' numba type) hold the layers as
    AMX tiles."""
    w_hh_t = weights_type.types[weights_type.fields.index("w_hh_t")]
    return w_hh_t.dtype == types.uint32 and w_hh_t.ndim == 5


def _configure_tiles(w):
    """amx.configure_rows() where generation's weights w hold the layers as AMX tiles
    (sample.py: an LSTM's), else nothing (compiled code only)."""
    raise NotImplementedError


@overload(_configure_tiles, jit_options=_opts)
def _configure_tiles_impl(w):
    if _tiled(w):
        return lambda w: amx.configure_rows()
    return lambda w: None


def _release_tiles(w):
    """amx.release() where _configure_tiles configured them (compiled code only)."""
    raise NotImplementedError


@overload(_release_tiles, jit_options=_opts)
def _release_tiles_impl(w):
    if _tiled(w):
        return lambda w: amx.release()
    return lambda w: None
