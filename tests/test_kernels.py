"""Each kernel against plain numpy (float32 tolerances); the vectorised transcendentals
against float64 libm over their whole range; the bfloat16 kernels against numpy on the
bfloat16-rounded operands."""
import numpy as np
import pytest
from numba import njit

from phi_rnn import bf16
from phi_rnn import kernels as K

rng = np.random.default_rng(42)


# The transcendentals exist only inlined into the kernels; these loops call them on arrays.
# Compiled in every run, not cached: a cached copy would keep an older kernels.py's code.

@njit(error_model="numpy")
def vexp(x, out):
    for i in range(x.shape[0]):
        out[i] = K.fast_exp(x[i])


@njit(error_model="numpy")
def vsigmoid(x, out):
    for i in range(x.shape[0]):
        out[i] = K.fast_sigmoid(x[i])


@njit(error_model="numpy")
def vtanh(x, out):
    for i in range(x.shape[0]):
        out[i] = K.fast_tanh(x[i])


def test_fast_exp_relative_error_below_2e7_over_float32_range():
    x = np.linspace(-87, 88, 1_000_001, dtype=np.float32)
    out = np.empty_like(x)
    vexp(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 2e-7


@pytest.mark.parametrize("function, exact", [
    (vsigmoid, lambda v: 1 / (1 + np.exp(-v))),
    (vtanh, np.tanh),
], ids=["sigmoid", "tanh"])
def test_fast_sigmoid_tanh_absolute_error_below_3e7(function, exact):
    x = np.concatenate([np.linspace(-40, 40, 800_001), rng.standard_normal(100_000) * 3]).astype(np.float32)
    out = np.empty_like(x)
    function(x, out)
    assert np.max(np.abs(out - exact(x.astype(np.float64)))) < 3e-7
    assert np.all(np.isfinite(out))


def test_fast_transcendentals_saturate_at_extremes():
    x = np.array([-1e30, -200, 200, 1e30], dtype=np.float32)
    s, t = np.empty_like(x), np.empty_like(x)
    vsigmoid(x, s)
    vtanh(x, t)
    np.testing.assert_allclose(s, [0, 0, 1, 1], atol=1e-30)
    np.testing.assert_array_equal(t, [-1, -1, 1, 1])


@pytest.mark.parametrize("ta, tb", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-12)])
def test_gemm_matches_numpy(ta, tb, dtype, tol):
    a = rng.standard_normal((7, 5) if not ta else (5, 7)).astype(dtype)
    b = rng.standard_normal((5, 3) if not tb else (3, 5)).astype(dtype)
    c = rng.standard_normal((7, 3)).astype(dtype)
    expect = 0.5 * (a.T if ta else a) @ (b.T if tb else b) + 2.0 * c
    K.gemm(ta, tb, 0.5, a, b, 2.0, c)
    np.testing.assert_allclose(c, expect, rtol=tol, atol=tol)


@pytest.fixture
def one_mkl_thread():
    """MKL and OpenMP set to one thread on this thread, as inside the per-thread blocks
    (where the small-GEMM backend takes over), for the length of the test."""
    from phi_rnn import blas
    with blas.one_thread():
        yield


@pytest.mark.parametrize("m, n, k", [(25, 512, 128), (7, 5, 3), (1250, 65, 128)])
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_backends_on_one_thread_match_numpy(m, n, k, ta, tb, beta, blas_backend, one_mkl_thread):
    """The float32 products as the per-thread blocks call them (MKL set to one thread), with
    operands that are column blocks of wider rows (GRU's gate blocks). libxsmm takes every
    one whose B is not transposed, OpenBLAS and oneDNN every one; MKL the rest."""
    from phi_rnn import blas
    a = rng.standard_normal((k, m + 3) if ta else (m, k + 3)).astype(np.float32)[:, :m if ta else k]
    b = rng.standard_normal((n, k + 2) if tb else (k, n + 2)).astype(np.float32)[:, :k if tb else n]
    c_wide = rng.standard_normal((m, n + 5)).astype(np.float32)
    c = c_wide[:, :n]
    if beta == 0:
        c[:, 0] = np.nan  # beta 0: c is not read
    expect = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b) + (beta * c if beta else 0)
    beyond = c_wide[:, n:].copy()
    blas.count_calls(True)
    K.gemm(ta, tb, 1.0, a, b, beta, c)
    blas.count_calls(False)
    np.testing.assert_allclose(c, expect, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    np.testing.assert_array_equal(c_wide[:, n:], beyond)  # the columns past n are not c's
    small = blas_backend in ("openblas", "onednn") or (blas_backend == "libxsmm" and not tb)
    assert blas.calls() == ((1, 0) if small else (0, 1))


def test_libxsmm_leaves_thread_binding_to_the_affinity_controller(with_libxsmm):
    """libxsmm's start-up sets OMP_PROC_BIND=TRUE where no binding is set, which made libgomp
    pin the main thread (and every thread it starts) to one CPU; small_gemm takes it out.
    The tests run with policy none: nothing may be bound."""
    import ctypes
    import os
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    assert "OMP_PROC_BIND" not in os.environ and libc.getenv(b"OMP_PROC_BIND") is None
    c = np.zeros((25, 512), np.float32)
    K.gemm(False, False, 1.0, np.ones((25, 128), np.float32), np.ones((128, 512), np.float32), 0.0, c)
    assert os.sched_getaffinity(0) == set(range(os.cpu_count())) & os.sched_getaffinity(os.getppid())


def test_libxsmm_leaves_a_product_streaming_over_8_mib_to_mkl(with_libxsmm, one_mkl_thread):
    """libxsmm does not block for the caches: a B operand over 8 MiB (here 1100 x 2048
    floats, 9 MB) goes to MKL, one just under it (1000 x 2048) to libxsmm; both exact."""
    from phi_rnn import blas
    blas.set_backend("libxsmm")
    for k, expected_calls in ((1000, (1, 0)), (1100, (0, 1))):
        a = rng.standard_normal((8, k)).astype(np.float32)
        b = rng.standard_normal((k, 2048)).astype(np.float32)
        c = np.empty((8, 2048), np.float32)
        blas.count_calls(True)
        K.gemm(False, False, 1.0, a, b, 0.0, c)
        assert blas.calls() == expected_calls, k
        np.testing.assert_allclose(c, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("inner", [1, 3, 128, 130])  # four rows of b at a time, then the remainder
def test_gemm_single_row_path_matches_numpy(beta, inner):
    """The batch-of-one path used for text generation."""
    a = rng.standard_normal((1, inner)).astype(np.float32)
    b = rng.standard_normal((inner, 512)).astype(np.float32)
    c = rng.standard_normal((1, 512)).astype(np.float32)
    if beta == 0:
        c[0, :3] = np.nan  # beta 0: c is not read
    expect = a.astype(np.float64) @ b.astype(np.float64) + (beta * c if beta else 0)
    K.gemm(False, False, 1.0, a, b, beta, c)
    np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_choose_draws_by_inverse_cdf_of_softmax(temperature):
    """The sampling draw against a float64 inverse CDF of softmax(logits / T), for uniforms on
    a fine grid; only thresholds within float32 rounding of a CDF step may differ."""
    logits = (rng.standard_normal(65) * 3).astype(np.float32)
    weights = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
    cdf = np.cumsum(weights) / weights.sum()
    uniforms = np.linspace(0, 1, 20_001, endpoint=False)
    expect = np.minimum(np.searchsorted(cdf, uniforms, side="right"), 64)
    probs = np.empty(65, np.float32)
    got = np.array([K.choose(logits, temperature, False, u, probs) for u in uniforms])
    near_step = np.min(np.abs(uniforms[:, None] - cdf[None, :]), axis=1) < 1e-5
    assert np.array_equal(got[~near_step], expect[~near_step])
    assert near_step.mean() < 0.01
    assert K.choose(logits, temperature, True, 0.5, probs) == np.argmax(logits)


def test_gather_step_and_accumulate_step_match_numpy():
    table = rng.standard_normal((11, 24)).astype(np.float32)
    tokens = rng.integers(0, 11, 30).astype(np.int32)
    out = np.empty((30, 24), np.float32)
    K.gather_step(out, table, tokens)
    np.testing.assert_array_equal(out, table[tokens])
    grad = rng.standard_normal((30, 24)).astype(np.float32)
    d_bias = np.ones(24, np.float32)
    d_table = np.ones((11, 24), np.float32)
    K.accumulate_step(grad, tokens, True, d_bias, d_table)
    expect = np.ones((11, 24))
    np.add.at(expect, tokens, grad.astype(np.float64))
    np.testing.assert_allclose(d_table, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_bias, 1 + grad.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
    K.accumulate_step(grad, tokens, False, d_bias, d_table)  # above the first layer: the bias only
    np.testing.assert_allclose(d_table, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_bias, 1 + 2 * grad.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("H", [128, 100, 16, 5])
@pytest.mark.parametrize("in_place", [False, True])
def test_generation_row_cell_matches_reference_and_the_training_cell(H, in_place):
    """row_cell.lstm_row_cell (one row, 16-lane IR; a unit count that leaves a masked last
    vector, or only one): c and h as the float64 reference and within a few float32 ulps of
    lstm_cell_forward's; gates not written; c may be c_prev itself."""
    from reference import sigmoid
    from phi_rnn import row_cell
    pre = rng.standard_normal((1, 4 * H)).astype(np.float32) * 4  # saturating gates too
    bias = rng.standard_normal(4 * H).astype(np.float32)
    c_prev = rng.standard_normal((1, H)).astype(np.float32) * 2
    gates = pre.copy()
    c = c_prev.copy() if in_place else np.full((1, H), np.nan, np.float32)
    h = np.full((1, H), np.nan, np.float32)
    row_cell.lstm_row_cell(gates, bias, c if in_place else c_prev, c, h)
    np.testing.assert_array_equal(gates, pre)
    p = pre.astype(np.float64) + bias
    i, f, o, g = sigmoid(p[:, :H]), sigmoid(p[:, H:2 * H]), sigmoid(p[:, 2 * H:3 * H]), np.tanh(p[:, 3 * H:])
    c_ref = f * c_prev + i * g
    np.testing.assert_allclose(c, c_ref, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(h, o * np.tanh(c_ref), atol=1e-6, rtol=1e-6)
    c_train, tc, h_train = (np.empty((1, H), np.float32) for _ in range(3))
    K.lstm_cell_forward(pre.copy(), bias, c_prev, c_train, tc, h_train)
    np.testing.assert_allclose(c, c_train, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(c_train).max())
    np.testing.assert_allclose(h, h_train, rtol=0, atol=4 * np.finfo(np.float32).eps)


def test_generation_row_cell_refuses_mismatched_shapes():
    from phi_rnn import row_cell
    a = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    with pytest.raises(ValueError):
        row_cell.lstm_row_cell(a(1, 40), a(40), a(1, 10), a(1, 10), a(1, 12))
    with pytest.raises(ValueError):
        row_cell.lstm_row_cell(a(2, 40), a(40), a(2, 10), a(2, 10), a(2, 10))

def test_lstm_cell_forward_backward_match_reference():
    from reference import sigmoid
    nb, H = 6, 8
    pre = rng.standard_normal((nb, 4 * H)).astype(np.float32) * 2
    bias = rng.standard_normal(4 * H).astype(np.float32)
    c_prev = rng.standard_normal((nb, H)).astype(np.float32)
    gates = pre.copy()
    c, tc, h = (np.empty((nb, H), np.float32) for _ in range(3))
    K.lstm_cell_forward(gates, bias, c_prev, c, tc, h)
    p = pre.astype(np.float64) + bias
    i, f, o, g = sigmoid(p[:, :H]), sigmoid(p[:, H:2 * H]), sigmoid(p[:, 2 * H:3 * H]), np.tanh(p[:, 3 * H:])
    c_ref = f * c_prev + i * g
    np.testing.assert_allclose(gates, np.concatenate([i, f, o, g], 1), atol=1e-6)
    np.testing.assert_allclose(c, c_ref, atol=1e-6)
    np.testing.assert_allclose(h, o * np.tanh(c_ref), atol=1e-6)

    dh_out = rng.standard_normal((nb, H)).astype(np.float32)
    dh = rng.standard_normal((nb, H)).astype(np.float32)
    dc = rng.standard_normal((nb, H)).astype(np.float32)
    dc_in = dc.astype(np.float64)
    K.lstm_cell_backward(gates, c_prev, tc, dh_out, dh, dc)
    t = np.tanh(c_ref)
    dht = dh_out + dh.astype(np.float64)
    dct = dc_in + dht * o * (1 - t * t)
    expect = np.concatenate([dct * g * i * (1 - i), dct * c_prev * f * (1 - f),
                             dht * t * o * (1 - o), dct * i * (1 - g * g)], 1)
    np.testing.assert_allclose(gates, expect, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dc, dct * f, atol=2e-5, rtol=1e-5)


def test_decoder_forward_backward_loss_and_gradients():
    from reference import log_softmax
    R, H, V = 40, 9, 13
    top = rng.standard_normal((R, H)).astype(np.float32)
    w = rng.standard_normal((V, H)).astype(np.float32)
    b = rng.standard_normal(V).astype(np.float32)
    targets = rng.integers(0, V, R).astype(np.int32)
    logits = np.empty((R, V), np.float32)
    a = K.DecoderActivations(top, targets, logits, np.empty(R, np.float32), logits)
    weights = K.DecoderWeights(np.ascontiguousarray(w.T), b, w)
    logits, row_loss = a.logits, a.row_loss
    K.decoder_forward(weights, a, np.float32(0.25))
    lp = log_softmax(top.astype(np.float64) @ w.T + b)
    np.testing.assert_allclose(row_loss, -lp[np.arange(R), targets], rtol=1e-5, atol=1e-5)
    d_logits = np.exp(lp)
    d_logits[np.arange(R), targets] -= 1
    d_logits *= 0.25
    np.testing.assert_allclose(logits, d_logits, atol=1e-6)
    d_w, d_b, d_top = np.empty_like(w), np.empty_like(b), np.empty_like(top)
    K.decoder_backward(weights, a, d_top, K.DecoderGradients(d_w, d_b))
    np.testing.assert_allclose(d_w, d_logits.T @ top, atol=1e-5)
    np.testing.assert_allclose(d_b, d_logits.sum(0), atol=1e-6)
    np.testing.assert_allclose(d_top, d_logits @ w, atol=1e-5)


def test_reduce_parts_sums_in_order_for_any_chunking():
    parts = rng.standard_normal((3, 1001)).astype(np.float32)
    expect = (parts[0] + parts[1]) + parts[2]  # float32, left to right
    for chunks in (1, 2, 7):
        out = np.empty(1001, np.float32)
        K.reduce_parts(parts, out, chunks)
        np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("shape", [(3, 37, 101), (2, 128, 64), (1, 16, 5)])  # rows past, on, at a tile
def test_reduce_parts_transposed_sums_in_order_for_any_chunking(shape):
    parts = rng.standard_normal(shape).astype(np.float32)
    expect = parts[0].T.copy()
    for p in range(1, shape[0]):
        expect += parts[p].T
    for chunks in (1, 2, 7):
        out = np.empty((shape[2], shape[1]), np.float32)
        K.reduce_parts_transposed(parts, out, chunks)
        np.testing.assert_array_equal(out, expect)


def test_rmsprop_step_matches_char_rnn_formula():
    n = 1000
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 10).astype(np.float32)
    m = np.abs(rng.standard_normal(n)).astype(np.float32)
    p64, g64, m64 = p.astype(np.float64), np.clip(g.astype(np.float64), -5, 5), m.astype(np.float64)
    m_ref = 0.95 * m64 + 0.05 * g64 ** 2
    p_ref = p64 - 2e-3 * g64 / (np.sqrt(m_ref) + 1e-8)
    sq_g, sq_p = np.zeros(7), np.zeros(7)
    K.rmsprop_step(p, g, m, 2e-3, 0.95, 5.0, 7, sq_g, sq_p)
    np.testing.assert_allclose(m, m_ref, rtol=1e-5)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sq_g.sum(), (g64 ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(sq_p.sum(), (p_ref ** 2).sum(), rtol=1e-5)


# ---------------------------------------------------------------- bfloat16 (--precision bf16)

needs_bf16 = pytest.mark.skipif(not bf16.native_features(), reason=bf16.refusal())


def _rounded(shape):
    """Random bfloat16 bits and the float64 values they stand for."""
    bits = bf16.to_bf16(rng.standard_normal(shape))
    return bits, bf16.to_float32(bits).astype(np.float64)


def _product_bound(a, b, c_before, beta):
    """What float32 accumulation of exact bfloat16 products may be off by."""
    return 1e-5 * (np.abs(a) @ np.abs(b) + abs(beta) * np.abs(c_before)) + 1e-30


@needs_bf16
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m", [1, 25, 300])
def test_gemm_on_bfloat16_operands_matches_numpy_on_the_rounded_values(ta, tb, m):
    n, k = 96, 40
    a, a64 = _rounded((k, m) if ta else (m, k))
    b, b64 = _rounded((n, k) if tb else (k, n))
    op_a, op_b = (a64.T if ta else a64), (b64.T if tb else b64)
    for beta in (0.0, 1.0):
        c_before = rng.standard_normal((m, n)).astype(np.float32)
        c = c_before.copy()
        K.gemm(ta, tb, 1.0, a, b, beta, c)
        assert (np.abs(c - (op_a @ op_b + beta * c_before)) <= _product_bound(op_a, op_b, c_before, beta)).all()


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("inner", [12, 13])
def test_batch_of_one_row_times_bfloat16_weights_rounds_the_row(beta, inner):
    """Generation in bfloat16: a float32 row (rounded as it is read) times bfloat16 weights."""
    x = rng.standard_normal((1, inner)).astype(np.float32)
    b, b64 = _rounded((inner, 70))
    x64 = bf16.to_float32(bf16.to_bf16(x)).astype(np.float64)
    c_before = rng.standard_normal((1, 70)).astype(np.float32)
    c = c_before.copy()
    K.gemm(False, False, 1.0, x, b, beta, c)
    assert (np.abs(c - (x64 @ b64 + beta * c_before)) <= _product_bound(x64, b64, c_before, beta)).all()


@njit(error_model="numpy")
def _to_operand(values, operand):
    K.to_operand(values, operand)


def test_to_operand_rounds_to_nearest_even_and_leaves_float32_alone():
    values = (rng.standard_normal((9, 33)) * 10.0 ** rng.integers(-5, 5, (9, 33))).astype(np.float32)
    bits = np.zeros(values.shape, np.uint16)
    _to_operand(values, bits)
    np.testing.assert_array_equal(bits, bf16.to_bf16(values))
    copy = values.copy()
    _to_operand(values, values)  # float32: the operand is the array itself
    np.testing.assert_array_equal(values, copy)


def test_dropout_multiply_into_a_bfloat16_operand_rounds_each_product():
    a = rng.standard_normal((6, 20)).astype(np.float32)
    mask = (rng.random((6, 20)) > 0.3).astype(np.float32) * np.float32(1 / 0.7)
    out = np.zeros(a.shape, np.uint16)
    K.multiply(a, mask, out)
    np.testing.assert_array_equal(out, bf16.to_bf16(a * mask))


@needs_bf16
def test_decoder_in_bfloat16_matches_numpy_on_the_rounded_operands():
    from reference import log_softmax
    R, H, V = 40, 9, 13
    top, top64 = _rounded((R, H))
    w32 = rng.standard_normal((V, H)).astype(np.float32)
    w, w64 = bf16.to_bf16(w32), bf16.to_float32(bf16.to_bf16(w32)).astype(np.float64)
    b = rng.standard_normal(V).astype(np.float32)
    targets = rng.integers(0, V, R).astype(np.int32)
    a = K.DecoderActivations(top, targets, np.empty((R, V), np.float32), np.empty(R, np.float32),
                             np.empty((R, V), np.uint16))
    weights = K.DecoderWeights(bf16.to_bf16(w32.T), b, w)
    K.decoder_forward(weights, a, np.float32(0.25))
    lp = log_softmax(top64 @ w64.T + b)
    np.testing.assert_allclose(a.row_loss, -lp[np.arange(R), targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a.logits_op, bf16.to_bf16(a.logits))  # the gradient, rounded
    d_logits64 = bf16.to_float32(a.logits_op).astype(np.float64)
    d_w, d_b, d_top = np.empty_like(w32), np.empty_like(b), np.empty((R, H), np.float32)
    K.decoder_backward(weights, a, d_top, K.DecoderGradients(d_w, d_b))
    np.testing.assert_allclose(d_w, d_logits64.T @ top64, atol=1e-5)
    np.testing.assert_allclose(d_b, a.logits.sum(0), atol=1e-6)  # the bias from the float32 gradient
    np.testing.assert_allclose(d_top, d_logits64 @ w64, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize("m", [1, 25])
def test_recurrent_product_on_packed_bfloat16_weights_matches_numpy(m):
    """The LSTM's per-step products in bfloat16 run on weights MKL laid out once per update."""
    k, n = 40, 96
    a, a64 = _rounded((m, k))
    b, b64 = _rounded((k, n))
    packed = bf16.packed_operand(1, n, k)
    bf16.pack_into(False, b, 1, packed)
    for beta in (0.0, 1.0):
        c_before = rng.standard_normal((m, n)).astype(np.float32)
        c = c_before.copy()
        K.recurrent_product(a, b, packed, np.float32(beta), c)
        assert (np.abs(c - (a64 @ b64 + beta * c_before)) <= _product_bound(a64, b64, c_before, beta)).all()
