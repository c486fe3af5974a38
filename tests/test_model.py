"""The network against the numpy reference (float32) and against float64 finite
differences, for both parallel strategies, with carried state and with dropout."""
import numpy as np
import pytest

import reference as R
from phi_rnn.model import Network, param_shapes

V, H, L, T, B = 7, 5, 2, 4, 3


def _setup(dtype, strategy, dropout=0.0, seed=0):
    rng = np.random.default_rng(seed)
    net = Network("lstm", V, H, L, dropout=dropout, strategy=strategy, dtype=dtype)
    net.init_params(rng)
    net.params.data[:] += rng.uniform(-0.5, 0.5, net.params.data.size)  # away from init symmetry
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = (rng.standard_normal((L, 2, B, H)) * 0.5).astype(dtype)  # a carried, nonzero state
    return net, x, y, state


def test_init_is_char_rnn():
    net = Network("lstm", 65, 128, 2)
    net.init_params(np.random.default_rng(1))
    for layer in range(2):
        b = net.params[f"layers.{layer}.b_ih"]
        assert np.all(b[128:256] == 1.0)
        rest = np.concatenate([b[:128], b[256:]])
        assert np.abs(rest).max() <= 0.08 and rest.std() > 0.03
    assert np.abs(net.params["layers.0.w_hh"]).max() <= 0.08
    assert net.params.data.size == sum(int(np.prod(s)) for _, s in param_shapes("lstm", 65, 128, 2))


@pytest.mark.parametrize("strategy", ["batch", "gemm"])
def test_float32_forward_backward_match_numpy_reference(strategy):
    net, x, y, state = _setup(np.float32, strategy)
    params = {k: v.astype(np.float64) for k, v in net.params.views.items()}
    loss_ref, cache, final_ref = R.lstm_forward(params, x, y, state, L)
    grads_ref = R.lstm_backward(params, x, y, cache, L)
    carried = state.copy()
    loss = net.forward(x, y, carried)
    net.backward(x, False)
    assert abs(loss - loss_ref) < 1e-5
    np.testing.assert_allclose(carried, final_ref, atol=1e-5)
    for name, g in grads_ref.items():
        np.testing.assert_allclose(net.grads[name], g, atol=2e-5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("strategy, dropout", [("batch", 0.0), ("gemm", 0.0), ("batch", 0.3)])
def test_float64_gradients_equal_finite_differences(strategy, dropout):
    net, x, y, state = _setup(np.float64, strategy, dropout)
    mask_seed = 5  # the same dropout masks in every evaluation

    def total_loss():  # what backward differentiates: the sum over timesteps
        rng = np.random.default_rng(mask_seed) if dropout else None
        return net.forward(x, y, state.copy(), rng) * T

    total_loss()
    net.backward(x, dropout > 0)
    analytic = net.grads.data.copy()
    numeric = np.empty_like(analytic)
    eps = 1e-6
    for k in range(analytic.size):
        keep = net.params.data[k]
        net.params.data[k] = keep + eps
        up = total_loss()
        net.params.data[k] = keep - eps
        down = total_loss()
        net.params.data[k] = keep
        numeric[k] = (up - down) / (2 * eps)
    rel = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert rel < 1e-6, rel
    for name, view in net.grads.views.items():  # and per tensor, so no small one hides
        start = view.__array_interface__["data"][0] - net.grads.data.__array_interface__["data"][0]
        sl = slice(start // 8, start // 8 + view.size)
        err = np.linalg.norm(analytic[sl] - numeric[sl]) / max(np.linalg.norm(numeric[sl]), 1e-12)
        assert err < 1e-6, (name, err)


def test_dropout_forward_matches_reference_with_the_same_masks():
    net, x, y, state = _setup(np.float64, "batch", dropout=0.4)
    net.forward(x, y, state.copy(), np.random.default_rng(9))
    masks = {l: net.masks[l % L].reshape(T, B, H).copy() for l in range(1, L + 1)}
    np.testing.assert_allclose(np.unique(masks[1]), [0.0, 1 / 0.6])
    params = dict(net.params.views)
    loss_ref, cache, _ = R.lstm_forward(params, x, y, state, L, masks)
    grads_ref = R.lstm_backward(params, x, y, cache, L, masks)
    loss = net.forward(x, y, state.copy(), np.random.default_rng(9))
    net.backward(x, True)
    assert abs(loss - loss_ref) < 1e-12
    for name, g in grads_ref.items():
        np.testing.assert_allclose(net.grads[name], g, atol=1e-12, err_msg=name)


def test_strategies_agree_and_state_carries_across_batches():
    a, x, y, state = _setup(np.float32, "batch")
    b = Network("lstm", V, H, L, strategy="gemm")
    b.params.data[:] = a.params.data
    sa, sb = state.copy(), state.copy()
    for _ in range(3):
        la, lb = a.forward(x, y, sa), b.forward(x, y, sb)
        assert abs(la - lb) < 1e-6
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    assert np.abs(sa - state).max() > 1e-3  # the state really moved on
