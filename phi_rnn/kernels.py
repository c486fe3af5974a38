"""Compiled kernels: vectorised transcendentals, the LSTM, GRU and RNN cells and their
recurrences, the loss, the optimizer and generation. Shapes are in each signature; T
timesteps, B batch rows, H hidden units, V vocabulary, G = 4H / 3H / H gate units. A
layer's activations live in (T*B, G) gate buffers (LSTM blocks i, f, o, g; GRU z, r, c),
stored as blocks of batch rows, time-major inside a block (one block: plain time-major).

Parallel strategy "batch": each thread runs a layer on its own block of batch rows (input
projection, recurrence, weight-gradient partials) with MKL inside set to one thread (numba
and MKL share one OpenMP runtime; nested parallelism is off), which also hands those
products to libxsmm when it is the backend (blas.py), so a timestep needs no barrier and no
activation changes core. Strategy "gemm": one block, a serial recurrence with
MKL-threaded GEMMs, for when batch rows per thread get too few (on the 2-core development
machine the batch strategy with libxsmm was still 2.2x faster at 2 rows per thread).

Kernels are compiled with error_model='numpy' (Python's error model blocks the loop
vectoriser on division) and never index at an offset inside a hot loop (slice views start
at 0), which the vectoriser also needs.
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from phi_rnn.blas import NO_TRANS, ROW_MAJOR, TRANS, dgemm, set_num_threads_local, sgemm

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
# libm's expf/tanhf are scalar calls the vectoriser cannot touch (~200 us for a 50 x 512 gate
# block). exp(x) = 2^n * e^r with |r| <= ln2/2: a degree-6 polynomial of e^r, and 2^n built
# from its exponent bits. Fused multiply-adds ('contract', the only fast-math flag) make the
# LSTM cell 30% faster (3.45 -> 2.27 ns per unit with the degree-6 polynomial) and are
# slightly more accurate (tests/test_kernels.py). These flags stay on the instructions when
# _exp32 is inlined into a kernel. float64 (used by the finite-difference gradient checks)
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


@njit(**_opts)
def vexp(x, out):
    """out = exp(x) elementwise (1-d): the tested entry to fast_exp."""
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


@njit(**_opts)
def vsigmoid(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_sigmoid(x[i])


@njit(**_opts)
def vtanh(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_tanh(x[i])


# ---------------------------------------------------------------- GEMM helpers

@njit(cache=True, error_model="numpy", fastmath={"contract"})
def _row_times_matrix(a, b, beta, c):
    """c (1, N) = a (1, K) @ b (K, N) + beta * c for a batch of one (text generation): b is
    streamed once, four of its rows per pass over c so that c is loaded and stored a
    quarter as often."""
    x = a[0]
    out = c[0]
    if beta == 0:  # as BLAS: c is not read (it may hold anything)
        out[:] = 0
    else:
        for n in range(out.shape[0]):
            out[n] = beta * out[n]
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


@njit(**_opts)
def gemm(trans_a, trans_b, alpha, a, b, beta, c):
    """c (M, N) = alpha * op(a) @ op(b) + beta * c; 2-d arrays with contiguous rows, float32
    (sgemm) or float64 (dgemm, for the gradient checks)."""
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
    """out = a * b elementwise over 2-d arrays (dropout masks)."""
    for r in prange(a.shape[0]):
        ar = a[r]
        br = b[r]
        o = out[r]
        for j in range(ar.shape[0]):
            o[j] = ar[j] * br[j]


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


# ---------------------------------------------------------------- recurrences
# One layer over all T steps for batch rows b0:b1. The first layer's one-hot input
# projection is a row gather done here, per step, while the rows are hot in cache:
# `table` (V, G) = w_ih^T with `tokens` (T, B); upper layers pass an empty table and arrive
# with their input projection (one GEMM over all steps) already in `gates`.

@njit(**_opts)
def gather_step(gates_t, table, tokens_t):
    """gates_t (nb, G) = table[tokens_t] (nb): the one-hot input projection of one step."""
    for b in range(gates_t.shape[0]):
        src = table[tokens_t[b]]
        dst = gates_t[b]
        for j in range(dst.shape[0]):
            dst[j] = src[j]


@njit(**_opts)
def accumulate_step(d_gates_t, tokens_t, d_bias, d_table):
    """d_bias (G) += column sums of d_gates_t (nb, G); d_table (V, G) rows tokens_t += rows:
    the bias and one-hot input weight gradients, accumulated while d_gates_t is in cache."""
    for b in range(d_gates_t.shape[0]):
        src = d_gates_t[b]
        for j in range(src.shape[0]):
            d_bias[j] += src[j]
        if d_table.shape[0] > 0:
            dst = d_table[tokens_t[b]]
            for j in range(src.shape[0]):
                dst[j] += src[j]


@njit(**_opts)
def lstm_step_forward(g, bias, w_hh_t, h_prev, c_prev, h, c, tanh_c):
    """One step for rows nb: g (nb, 4H) input projection in, activations out; w_hh_t (H, 4H)
    the recurrent weights transposed; h_prev, c_prev (nb, H) in; h, c, tanh_c (nb, H) out."""
    gemm(False, False, ONE, h_prev, w_hh_t, ONE, g)
    lstm_cell_forward(g, bias, c_prev, c, tanh_c, h)


@njit(**_opts)
def lstm_recurrence_forward(gates, bias, table, tokens, b0, w_hh_t, h0, c0, hs, cs, tanh_c):
    """One block of nb batch rows (columns b0.. of tokens (T, B)), all steps. gates (T, nb, 4H):
    input projection in (unless the one-hot table (V, 4H) is given), activations out; bias
    (4H); w_hh_t (H, 4H); h0, c0 (nb, H) the state before step 0; hs, cs, tanh_c (T, nb, H)
    after each step."""
    nb = h0.shape[0]
    for t in range(gates.shape[0]):
        g = gates[t]
        if table.shape[0] > 0:
            gather_step(g, table, tokens[t, b0:b0 + nb])
        if t == 0:
            lstm_step_forward(g, bias, w_hh_t, h0, c0, hs[0], cs[0], tanh_c[0])
        else:
            lstm_step_forward(g, bias, w_hh_t, hs[t - 1], cs[t - 1], hs[t], cs[t], tanh_c[t])


@njit(**_opts)
def lstm_recurrence_backward(gates, w_hh, c0, cs, tanh_c, dhs, dh, dc, tokens, b0, d_bias, d_table):
    """The block's steps T-1..0. gates (T, nb, 4H): activations in, pre-activation gradients
    out; dhs (T, nb, H): gradient of each step's output from above; dh, dc (nb, H): the
    recurrent gradients (zeroed by the caller: truncated BPTT); d_bias (4H) and d_table
    (V, 4H, or empty above the first layer) get this block's partial gradients."""
    nb = c0.shape[0]
    for t in range(gates.shape[0] - 1, -1, -1):
        g = gates[t]
        c_prev = c0 if t == 0 else cs[t - 1]
        lstm_cell_backward(g, c_prev, tanh_c[t], dhs[t], dh, dc)
        accumulate_step(g, tokens[t, b0:b0 + nb], d_bias, d_table)
        if t > 0:  # the initial state is a constant: no gradient flows into it
            gemm(False, False, ONE, g, w_hh, ZERO, dh)


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
def gru_step_forward(g, bias, w_hh_t, h_prev, h, rh):
    """One step for rows nb: g (nb, 3H) input projection in, activations out; w_hh_t (H, 3H);
    h_prev (nb, H) in; h, rh = r*h_prev (nb, H) out."""
    H = h_prev.shape[1]
    gemm(False, False, ONE, h_prev, w_hh_t[:, 0:2 * H], ONE, g[:, 0:2 * H])
    gru_gates_forward(g, bias, h_prev, rh)
    gemm(False, False, ONE, rh, w_hh_t[:, 2 * H:3 * H], ONE, g[:, 2 * H:3 * H])
    gru_output_forward(g, bias, h_prev, h)


@njit(**_opts)
def gru_recurrence_forward(gates, bias, table, tokens, b0, w_hh_t, h0, hs, rh):
    """As lstm_recurrence_forward, for (T, nb, 3H) gates; rh (T, nb, H)."""
    nb = h0.shape[0]
    for t in range(gates.shape[0]):
        g = gates[t]
        if table.shape[0] > 0:
            gather_step(g, table, tokens[t, b0:b0 + nb])
        if t == 0:
            gru_step_forward(g, bias, w_hh_t, h0, hs[0], rh[0])
        else:
            gru_step_forward(g, bias, w_hh_t, hs[t - 1], hs[t], rh[t])


@njit(**_opts)
def gru_recurrence_backward(gates, w_hh, h0, hs, dhs, dh, d_rh, tokens, b0, d_bias, d_table):
    """As lstm_recurrence_backward; d_rh (nb, H) is scratch for the gradient of r*h."""
    nb, H = h0.shape
    for t in range(gates.shape[0] - 1, -1, -1):
        g = gates[t]
        h_prev = h0 if t == 0 else hs[t - 1]
        gru_output_backward(g, h_prev, dhs[t], dh)
        gemm(False, False, ONE, g[:, 2 * H:3 * H], w_hh[2 * H:3 * H], ZERO, d_rh)
        gru_reset_backward(g, h_prev, d_rh, dh)
        accumulate_step(g, tokens[t, b0:b0 + nb], d_bias, d_table)
        if t > 0:
            gemm(False, False, ONE, g[:, 0:2 * H], w_hh[0:2 * H], ONE, dh)


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
def rnn_recurrence_forward(gates, bias, table, tokens, b0, w_hh_t, h0, hs):
    """As lstm_recurrence_forward, for (T, nb, H) gates holding h' = tanh(a)."""
    nb = h0.shape[0]
    for t in range(gates.shape[0]):
        g = gates[t]
        if table.shape[0] > 0:
            gather_step(g, table, tokens[t, b0:b0 + nb])
        if t == 0:
            rnn_step_forward(g, bias, w_hh_t, h0, hs[0])
        else:
            rnn_step_forward(g, bias, w_hh_t, hs[t - 1], hs[t])


@njit(**_opts)
def rnn_recurrence_backward(gates, w_hh, dhs, dh, tokens, b0, d_bias, d_table):
    """As lstm_recurrence_backward, for (T, nb, H) gates holding h' = tanh(a)."""
    nb = dh.shape[0]
    for t in range(gates.shape[0] - 1, -1, -1):
        g = gates[t]
        dho = dhs[t]
        for b in range(g.shape[0]):
            gb = g[b]
            ob = dho[b]
            hb = dh[b]
            for j in range(gb.shape[0]):
                a = gb[j]
                gb[j] = (ob[j] + hb[j]) * (ONE - a * a)
        accumulate_step(g, tokens[t, b0:b0 + nb], d_bias, d_table)
        if t > 0:
            gemm(False, False, ONE, g, w_hh, ZERO, dh)


# ---------------------------------------------------------------- one layer, any cell
LSTM, GRU, RNN = 0, 1, 2
KINDS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


@njit(**_opts)
def layer_forward(kind, gates, bias, table, tokens, b0, w_ih_t, below, w_hh_t, h0, c0, hs, cs, aux, h_last,
                  c_last):
    """One block of nb batch rows of a layer, all T steps, rows time-major inside the block:
    gates (T*nb, G) out (its input projection is `below` (T*nb, H_in) @ w_ih_t (H_in, G), or
    the one-hot `table` gathered per step); w_hh_t (H, G). The forward takes the weights
    transposed so that every product is A @ B, the form libxsmm runs (blas.py). h0, c0
    (nb, H) the state before step 0; hs, cs, aux (T*nb, H): h, c (LSTM) and tanh(c) (LSTM)
    / r*h (GRU) after each step; h_last, c_last (nb, H) get the state after the last step."""
    T = tokens.shape[0]
    nb, H = h0.shape
    G = gates.shape[1]
    if table.shape[0] == 0:
        gemm(False, False, ONE, below, w_ih_t, ZERO, gates)
    g3 = gates.reshape((T, nb, G))
    h3 = hs.reshape((T, nb, H))
    c3 = cs.reshape((T, nb, H))
    a3 = aux.reshape((T, nb, H))
    if kind == LSTM:
        lstm_recurrence_forward(g3, bias, table, tokens, b0, w_hh_t, h0, c0, h3, c3, a3)
        c_last[:] = c3[T - 1]
    elif kind == GRU:
        gru_recurrence_forward(g3, bias, table, tokens, b0, w_hh_t, h0, h3, a3)
    else:
        rnn_recurrence_forward(g3, bias, table, tokens, b0, w_hh_t, h0, h3)
    h_last[:] = h3[T - 1]


@njit(**_opts)
def layer_backward(kind, gates, tokens, b0, w_ih, below, w_hh, h0, c0, hs, cs, aux, d_out, dh, dc,
                   d_bias, d_table, d_w_hh_t, d_w_ih_t, d_below):
    """The block's backward, all steps: gates (T*nb, G) activations in, pre-activation
    gradients out; d_out (T*nb, H) the gradient of the layer's outputs. The block's partial
    gradients go to d_bias (G), d_table (V, G; first layer) or d_w_ih_t (H_in, G) (above it),
    and d_w_hh_t (H, G): the weight gradients transposed, x^T dG, which MKL runs at 97
    GFLOP/s against 87 for dG^T x (1 thread, 1250 rows); reduce_parts_transposed sums and
    turns them. d_below (T*nb, H_in; above the first layer) gets the gradient of the layer's
    input. d_out and d_below may be the same rows: d_out is read before."""
    T = tokens.shape[0]
    nb, H = h0.shape
    G = gates.shape[1]
    dh[:] = ZERO  # truncated BPTT: no gradient arrives from beyond the last step
    dc[:] = ZERO
    d_bias[:] = ZERO
    d_table[:] = ZERO
    g3 = gates.reshape((T, nb, G))
    d3 = d_out.reshape((T, nb, H))
    if kind == LSTM:
        lstm_recurrence_backward(g3, w_hh, c0, cs.reshape((T, nb, H)), aux.reshape((T, nb, H)), d3, dh, dc,
                                 tokens, b0, d_bias, d_table)
    elif kind == GRU:
        gru_recurrence_backward(g3, w_hh, h0, hs.reshape((T, nb, H)), d3, dh, dc, tokens, b0, d_bias, d_table)
    else:
        rnn_recurrence_backward(g3, w_hh, d3, dh, tokens, b0, d_bias, d_table)
    # weight gradients over all steps: the recurrent input is h0 at step 0, then hs[0:T-1]
    hh = 2 * H if kind == GRU else G  # GRU: z, r act on h; the candidate's weights on r*h
    gemm(True, False, ONE, h0, gates[:nb, :hh], ZERO, d_w_hh_t[:, :hh])
    gemm(True, False, ONE, hs[:(T - 1) * nb], gates[nb:, :hh], ONE, d_w_hh_t[:, :hh])
    if kind == GRU:
        gemm(True, False, ONE, aux, gates[:, hh:], ZERO, d_w_hh_t[:, hh:])
    if d_table.shape[0] == 0:  # above the first layer
        gemm(True, False, ONE, below, gates, ZERO, d_w_ih_t)
        gemm(False, False, ONE, gates, w_ih, ZERO, d_below)


# Batch strategy: block p of nparts holds batch rows [p*B/nparts, (p+1)*B/nparts), and every
# (T*B)-row buffer stores the blocks one after another, time-major inside each. A thread then
# runs a layer's input projection, recurrence, weight-gradient partials and input gradient on
# its own contiguous rows with MKL sequential inside (left to its global count it nests, ~3x
# slower on 2 cores): no activation cache line is written by one core and read by another.

@njit(parallel=True, **_opts)
def forward_parallel(kind, gates, bias, table, tokens, w_ih_t, below, w_hh_t, h0, c0, hs, cs, aux,
                     h_last, c_last, nparts):
    """layer_forward for every block; h0, c0, h_last, c_last (B, H)."""
    T, B = tokens.shape
    for p in prange(nparts):
        set_num_threads_local(1)
        b0, b1 = p * B // nparts, (p + 1) * B // nparts
        r0, r1 = T * b0, T * b1
        layer_forward(kind, gates[r0:r1], bias, table, tokens, b0, w_ih_t, below[r0:r1], w_hh_t, h0[b0:b1],
                      c0[b0:b1], hs[r0:r1], cs[r0:r1], aux[r0:r1], h_last[b0:b1], c_last[b0:b1])
        set_num_threads_local(0)


@njit(parallel=True, **_opts)
def backward_parallel(kind, gates, tokens, w_ih, below, w_hh, h0, c0, hs, cs, aux, d_out, dh, dc,
                      d_bias_parts, d_table_parts, d_w_hh_parts, d_w_ih_parts, d_below, nparts):
    """layer_backward for every block; the (nparts, ...) arrays get each block's partial
    gradients, summed by reduce_parts(_transposed) in a fixed order."""
    T, B = tokens.shape
    for p in prange(nparts):
        set_num_threads_local(1)
        b0, b1 = p * B // nparts, (p + 1) * B // nparts
        r0, r1 = T * b0, T * b1
        layer_backward(kind, gates[r0:r1], tokens, b0, w_ih, below[r0:r1], w_hh, h0[b0:b1], c0[b0:b1],
                       hs[r0:r1], cs[r0:r1], aux[r0:r1], d_out[r0:r1], dh[b0:b1], dc[b0:b1], d_bias_parts[p],
                       d_table_parts[p], d_w_hh_parts[p], d_w_ih_parts[p], d_below[r0:r1])
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


@njit(parallel=True, **_opts)
def reduce_parts_transposed(parts, out, nchunks):
    """out (C, R) = the sum over p of parts (P, R, C) transposed, in the order p = 0, 1, ...
    Each chunk of out's rows sums a contiguous run of every parts row, then stores it down a
    column of out."""
    C, R = out.shape
    for k in prange(nchunks):
        lo, hi = k * C // nchunks, (k + 1) * C // nchunks
        acc = np.empty(hi - lo, out.dtype)
        for r in range(R):
            acc[:] = parts[0, r, lo:hi]
            for p in range(1, parts.shape[0]):
                src = parts[p, r, lo:hi]
                for j in range(acc.shape[0]):
                    acc[j] += src[j]
            for j in range(acc.shape[0]):
                out[lo + j, r] = acc[j]


# ---------------------------------------------------------------- decoder and loss

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
def decoder_forward(top, dec_w_t, dec_b, targets, logits, row_loss, grad_scale):
    """A block of R rows: logits (R, V) = top (R, H) @ dec_w_t (H, V) + dec_b; row_loss (R) gets each
    row's NLL (summed by the caller in a fixed order) and logits d(loss)/d(logits), where loss
    = grad_scale * the sum of the row NLLs."""
    for r in range(logits.shape[0]):
        logits[r] = dec_b
    gemm(False, False, ONE, top, dec_w_t, ONE, logits)
    for r in range(logits.shape[0]):
        row_loss[r] = softmax_nll_row(logits[r], targets[r], grad_scale)


@njit(**_opts)
def decoder_backward(d_logits, top, dec_w, d_w, d_b, d_top):
    """A block's decoder gradients: partials d_w (V, H), d_b (V); d_top (R, H) = the gradient
    of the decoder's input."""
    gemm(True, False, ONE, d_logits, top, ZERO, d_w)
    d_b[:] = ZERO
    for r in range(d_logits.shape[0]):
        row = d_logits[r]
        for j in range(row.shape[0]):
            d_b[j] += row[j]
    gemm(False, False, ONE, d_logits, dec_w, ZERO, d_top)


@njit(parallel=True, **_opts)
def decoder_forward_parallel(top, dec_w_t, dec_b, targets, logits, row_loss, grad_scale, T, nparts):
    """decoder_forward for every block of T * (batch rows) rows (the layout above)."""
    B = logits.shape[0] // T
    for p in prange(nparts):
        set_num_threads_local(1)
        r0, r1 = T * (p * B // nparts), T * ((p + 1) * B // nparts)
        decoder_forward(top[r0:r1], dec_w_t, dec_b, targets[r0:r1], logits[r0:r1], row_loss[r0:r1], grad_scale)
        set_num_threads_local(0)


@njit(parallel=True, **_opts)
def decoder_backward_parallel(d_logits, top, dec_w, d_w_parts, d_b_parts, d_top, T, nparts):
    """decoder_backward for every block; partials in d_w_parts (nparts, V, H), d_b_parts (nparts, V)."""
    B = d_logits.shape[0] // T
    for p in prange(nparts):
        set_num_threads_local(1)
        r0, r1 = T * (p * B // nparts), T * ((p + 1) * B // nparts)
        decoder_backward(d_logits[r0:r1], top[r0:r1], dec_w, d_w_parts[p], d_b_parts[p], d_top[r0:r1])
        set_num_threads_local(0)


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
# and the decoder in one compiled call.

@njit(**_opts)
def step_forward(kind, g, bias, w_hh_t, h_prev, c_prev, h, c, aux):
    if kind == LSTM:
        lstm_step_forward(g, bias, w_hh_t, h_prev, c_prev, h, c, aux)
    elif kind == GRU:
        gru_step_forward(g, bias, w_hh_t, h_prev, h, aux)
    else:
        rnn_step_forward(g, bias, w_hh_t, h_prev, h)


@njit(**_opts)
def generation_step(kind, token, weights, state, aux, gates, logits):
    """weights = (w_ih0_t (V, G), w_ih_t (max(L-1, 1), H, G), w_hh_t (L, H, G), bias (L, G),
    dec_w_t (H, V), dec_b (V)): the weights transposed, as the training forward takes them;
    state (L, 2, 2, 1, H): per layer h and c at [0] (in) and [1] (out); aux (1, H), gates
    (1, G) scratch; logits (1, V) out."""
    w_ih0_t, w_ih_t, w_hh_t, bias, dec_w_t, dec_b = weights
    L = w_hh_t.shape[0]
    for layer in range(L):
        hs = state[layer, 0]
        cs = state[layer, 1]
        if layer == 0:
            gates[0, :] = w_ih0_t[token]  # the one-hot input projection
        else:
            gemm(False, False, ONE, state[layer - 1, 0, 0], w_ih_t[layer - 1], ZERO, gates)
        step_forward(kind, gates, bias[layer], w_hh_t[layer], hs[0], cs[0], hs[1], cs[1], aux)
        hs[0] = hs[1]
        cs[0] = cs[1]
    logits[0, :] = dec_b
    gemm(False, False, ONE, state[L - 1, 0, 0], dec_w_t, ONE, logits)


@njit(**_opts)
def choose(logits, temperature, argmax, u, probs):
    """Next token from logits (V): argmax, or the inverse-CDF draw with uniform u from
    softmax(logits / temperature); probs (V) is scratch for the unnormalised weights
    (vectorised float32 exp: 0.48 -> 0.15 us per draw with libm's float64 exp)."""
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
def prime(kind, text, weights, state, aux, gates, logits):
    for k in range(text.shape[0]):
        generation_step(kind, text[k], weights, state, aux, gates, logits)


@njit(**_opts)
def generate(kind, uniforms, temperature, argmax, weights, state, aux, gates, logits, out):
    """out[k] = the k-th sampled token, each fed back in; `logits` carries the prediction
    between calls."""
    probs = np.empty(logits.shape[1], np.float32)
    for k in range(out.shape[0]):
        token = choose(logits[0], temperature, argmax, uniforms[k], probs)
        out[k] = token
        generation_step(kind, token, weights, state, aux, gates, logits)
