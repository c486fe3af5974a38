"""Each kernel against plain numpy (float32 tolerances); the vectorised transcendentals
against float64 libm over their whole range."""
import numpy as np
import pytest

from phi_rnn import kernels as K

rng = np.random.default_rng(42)


def test_fast_exp_relative_error_below_2e7_over_float32_range():
    x = np.linspace(-87, 88, 1_000_001, dtype=np.float32)
    out = np.empty_like(x)
    K.vexp(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 2e-7


@pytest.mark.parametrize("name, exact", [
    ("vsigmoid", lambda v: 1 / (1 + np.exp(-v))),
    ("vtanh", np.tanh),
])
def test_fast_sigmoid_tanh_absolute_error_below_3e7(name, exact):
    x = np.concatenate([np.linspace(-40, 40, 800_001), rng.standard_normal(100_000) * 3]).astype(np.float32)
    out = np.empty_like(x)
    getattr(K, name)(x, out)
    assert np.max(np.abs(out - exact(x.astype(np.float64)))) < 3e-7
    assert np.all(np.isfinite(out))


def test_fast_transcendentals_saturate_at_extremes():
    x = np.array([-1e30, -200, 200, 1e30], dtype=np.float32)
    s, t = np.empty_like(x), np.empty_like(x)
    K.vsigmoid(x, s)
    K.vtanh(x, t)
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


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("rows", [1, 3, 65, 512])  # four rows at a time, then the remainder
def test_gemm_single_row_path_matches_numpy(beta, rows):
    """The batch-of-one path (dot products, reassociated) used for text generation."""
    a = rng.standard_normal((1, 128)).astype(np.float32)
    b = rng.standard_normal((rows, 128)).astype(np.float32)
    c = rng.standard_normal((1, rows)).astype(np.float32)
    expect = a.astype(np.float64) @ b.T.astype(np.float64) + beta * c
    K.gemm(False, True, 1.0, a, b, beta, c)
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
    K.accumulate_step(grad, tokens, d_bias, d_table)
    expect = np.ones((11, 24))
    np.add.at(expect, tokens, grad.astype(np.float64))
    np.testing.assert_allclose(d_table, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_bias, 1 + grad.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)


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
    logits, row_loss = np.empty((R, V), np.float32), np.empty(R, np.float32)
    K.decoder_forward(top, w, b, targets, logits, row_loss, np.float32(0.25))
    lp = log_softmax(top.astype(np.float64) @ w.T + b)
    np.testing.assert_allclose(row_loss, -lp[np.arange(R), targets], rtol=1e-5, atol=1e-5)
    d_logits = np.exp(lp)
    d_logits[np.arange(R), targets] -= 1
    d_logits *= 0.25
    np.testing.assert_allclose(logits, d_logits, atol=1e-6)
    d_w, d_b, d_top = np.empty_like(w), np.empty_like(b), np.empty_like(top)
    K.decoder_backward(logits, top, w, d_w, d_b, d_top)
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


def test_reduce_parts_transposed_sums_in_order_for_any_chunking():
    parts = rng.standard_normal((3, 37, 101)).astype(np.float32)
    expect = ((parts[0] + parts[1]) + parts[2]).T
    for chunks in (1, 2, 7):
        out = np.empty((101, 37), np.float32)
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
