"""The network against the numpy reference (float32) and against float64 finite
differences, for both parallel strategies, with carried state and with dropout."""
import numpy as np
import pytest

import reference as R
from phi_rnn.model import MODELS, Network, aligned_zeros, param_shapes

V, H, L, T, B = 7, 5, 2, 4, 3


def _setup(dtype, strategy, dropout=0.0, seed=0, model="lstm"):
    rng = np.random.default_rng(seed)
    net = Network(model, V, H, L, dropout=dropout, strategy=strategy, dtype=dtype)
    net.init_params(rng)
    net.params.data[:] += rng.uniform(-0.5, 0.5, net.params.data.size)  # away from init symmetry
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = (rng.standard_normal((L, 2, B, H)) * 0.5).astype(dtype)  # a carried, nonzero state
    return net, x, y, state


def time_major(net, rows):
    """A (T*B, ...) workspace buffer of net's last pass (blocks of batch rows, time-major
    inside each: kernels.py) in (T, B, ...) order."""
    out = np.empty_like(rows)
    out[net.perm] = rows
    return out.reshape(T, B, *rows.shape[1:])


def test_gru_and_rnn_init_is_uniform_without_forget_bias():
    for model, blocks in (("gru", 3), ("rnn", 1)):
        net = Network(model, 65, 32, 2)
        net.init_params(np.random.default_rng(1))
        assert net.params["layers.1.w_hh"].shape == (blocks * 32, 32)
        assert np.abs(net.params.data).max() <= 0.08 and net.params.data.std() > 0.04


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


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("steps, batch", [(1, 5), (2, 1), (3, 7)])
def test_block_layout_edges_match_reference_in_float64(model, steps, batch):
    """One step (no recurrent weight-gradient rows after the first), one batch row (one
    block), and blocks of unequal size (7 rows over the threads)."""
    rng = np.random.default_rng(5)
    net = Network(model, V, H, L, dtype=np.float64)
    net.init_params(rng)
    x = rng.integers(0, V, (steps, batch)).astype(np.int32)
    y = rng.integers(0, V, (steps, batch)).astype(np.int32)
    state = rng.standard_normal((L, 2, batch, H))
    if model != "lstm":
        state[:, 1] = 0
    params = dict(net.params.views)
    loss_ref, cache, final_ref = R.forward(model, params, x, y, state, L)
    grads_ref = R.backward(model, params, x, y, cache, L)
    carried = state.copy()
    assert abs(net.forward(x, y, carried) - loss_ref) < 1e-12
    net.backward(x, False)
    np.testing.assert_allclose(carried, final_ref, atol=1e-12)
    for name, g in grads_ref.items():
        np.testing.assert_allclose(net.grads[name], g, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("strategy", ["batch", "gemm"])
def test_float32_forward_backward_match_numpy_reference(strategy, model, blas_backend):
    net, x, y, state = _setup(np.float32, strategy, model=model)
    if model != "lstm":
        state[:, 1] = 0  # only the LSTM has a cell state
    params = {k: v.astype(np.float64) for k, v in net.params.views.items()}
    loss_ref, cache, final_ref = R.forward(model, params, x, y, state, L)
    grads_ref = R.backward(model, params, x, y, cache, L)
    carried = state.copy()
    loss = net.forward(x, y, carried)
    net.backward(x, False)
    assert abs(loss - loss_ref) < 1e-5
    np.testing.assert_allclose(carried, final_ref, atol=1e-5)
    for name, g in grads_ref.items():
        np.testing.assert_allclose(net.grads[name], g, atol=2e-5, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("model, strategy, dropout", [
    ("lstm", "batch", 0.0), ("lstm", "gemm", 0.0), ("lstm", "batch", 0.3),
    ("gru", "batch", 0.0), ("gru", "gemm", 0.3), ("rnn", "batch", 0.0), ("rnn", "gemm", 0.3)])
def test_float64_gradients_equal_finite_differences(model, strategy, dropout):
    net, x, y, state = _setup(np.float64, strategy, dropout, model=model)
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


@pytest.mark.parametrize("model", MODELS)
def test_dropout_forward_matches_reference_with_the_same_masks(model):
    net, x, y, state = _setup(np.float64, "batch", dropout=0.4, model=model)
    state[:, 1] = 0 if model != "lstm" else state[:, 1]
    net.forward(x, y, state.copy(), np.random.default_rng(9))
    masks = {l: time_major(net, net.masks[l - 1]) for l in range(1, L + 1)}
    np.testing.assert_allclose(np.unique(masks[1]), [0.0, 1 / 0.6])
    params = dict(net.params.views)
    loss_ref, cache, _ = R.forward(model, params, x, y, state, L, masks)
    grads_ref = R.backward(model, params, x, y, cache, L, masks)
    loss = net.forward(x, y, state.copy(), np.random.default_rng(9))
    net.backward(x, True)
    assert abs(loss - loss_ref) < 1e-12
    for name, g in grads_ref.items():
        np.testing.assert_allclose(net.grads[name], g, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("model", MODELS)
def test_strategies_agree_and_state_carries_across_batches(model):
    a, x, y, state = _setup(np.float32, "batch", model=model)
    b = Network(model, V, H, L, strategy="gemm")
    b.params.data[:] = a.params.data
    sa, sb = state.copy(), state.copy()
    for _ in range(3):
        la, lb = a.forward(x, y, sa), b.forward(x, y, sb)
        assert abs(la - lb) < 1e-6
    np.testing.assert_allclose(sa, sb, atol=1e-6)
    assert np.abs(sa - state).max() > 1e-3  # the state really moved on


@pytest.mark.parametrize("model", MODELS)
def test_libxsmm_backend_runs_every_per_thread_product_and_matches_mkl(model, with_libxsmm):
    """A char-rnn sized iteration with the batch strategy: on libxsmm, every float32 GEMM of
    the forward and backward runs there (MKL would run each on one thread); loss and
    gradients agree with MKL's to float32 accuracy."""
    from phi_rnn import blas
    rng = np.random.default_rng(1)
    net = Network(model, 65, 128, 2, strategy="batch")
    net.init_params(rng)
    x = rng.integers(0, 65, (50, 50)).astype(np.int32)
    y = rng.integers(0, 65, (50, 50)).astype(np.int32)
    results = {}
    for backend in ("libxsmm", "mkl"):
        blas.set_backend(backend)
        blas.count_calls(True)
        loss = net.forward(x, y, net.zero_state(50))
        net.backward(x, False)
        results[backend] = loss, net.grads.data.copy(), blas.calls()
    on_libxsmm, on_mkl = results["libxsmm"][2]
    # per block: each layer's 50 recurrent products forward and 49 backward (GRU: twice)
    assert on_mkl == 0 and on_libxsmm >= 2 * 2 * 99 * (2 if model == "gru" else 1)
    assert results["mkl"][2] == (0, on_libxsmm)  # the same calls, all to MKL
    (loss_x, grads_x, _), (loss_m, grads_m, _) = results["libxsmm"], results["mkl"]
    assert abs(loss_x - loss_m) < 1e-5 * abs(loss_m)
    np.testing.assert_allclose(grads_x, grads_m, rtol=1e-3, atol=1e-5 * np.abs(grads_m).max())


# ---------------------------------------------------------------- bfloat16 (--precision bf16)

def _bf16_native():
    from phi_rnn import bf16
    return bool(bf16.native_features())


needs_bf16 = pytest.mark.skipif(not _bf16_native(), reason="no native bfloat16 on this CPU")
BF16_RELATIVE = 2e-2  # bfloat16 keeps 8 significant bits: each operand within 2^-9 relative


@needs_bf16
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("strategy, dropout", [("batch", 0.0), ("gemm", 0.0), ("batch", 0.3)])
def test_bfloat16_forward_backward_track_the_float64_reference(strategy, dropout, model):
    """Mixed precision: the loss, the carried state and every gradient within bfloat16's
    rounding of the float64 reference; float32 master weights untouched by the rounding."""
    float32_net, x, y, state = _setup(np.float32, strategy, dropout, model=model)
    net = Network(model, V, H, L, dropout=dropout, strategy=strategy, precision="bf16")
    net.params.data[:] = float32_net.params.data
    if model != "lstm":
        state[:, 1] = 0
    params = {k: v.astype(np.float64) for k, v in net.params.views.items()}
    carried = state.copy()
    loss = net.forward(x, y, carried, np.random.default_rng(9) if dropout else None)
    net.backward(x, dropout > 0)
    masks = {layer: time_major(net, net.masks[layer - 1]) for layer in range(1, L + 1)} if dropout else None
    loss_ref, cache, final_ref = R.forward(model, params, x, y, state, L, masks)
    grads_ref = R.backward(model, params, x, y, cache, L, masks)
    assert abs(loss - loss_ref) < BF16_RELATIVE * abs(loss_ref)
    np.testing.assert_allclose(carried, final_ref, atol=BF16_RELATIVE)
    for name, g in grads_ref.items():
        error = np.linalg.norm(net.grads[name] - g) / max(np.linalg.norm(g), 1e-3)
        assert error < BF16_RELATIVE, (name, error)
    np.testing.assert_array_equal(net.params.data, float32_net.params.data)


@needs_bf16
@pytest.mark.parametrize("model", MODELS)
def test_a_short_bfloat16_training_tracks_float32(model):
    """60 RMSprop updates (char-rnn's rate) of a 2 x 32 network on a repeating text from the same start: each
    iteration's loss in bfloat16 within 0.02 of float32's."""
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, np.uint8) % 29
    T_, B_ = 16, 8
    losses = {}
    for precision in ("fp32", "bf16"):
        net = Network(model, 29, 32, 2, dropout=0.0, precision=precision)
        net.init_params(np.random.default_rng(3))
        state = net.zero_state(B_)
        losses[precision] = []
        for i in range(60):
            start = (i * T_ * B_) % (len(text) - T_ * B_ - 1)
            chunk = text[start:start + T_ * B_ + 1].astype(np.int32)
            x, y = chunk[:-1].reshape(B_, T_).T.copy(), chunk[1:].reshape(B_, T_).T.copy()
            losses[precision].append(net.forward(x, y, state))
            net.backward(x, False)
            net.update(2e-3, 0.95, 5.0)
    fp32, bf16 = np.array(losses["fp32"]), np.array(losses["bf16"])
    assert fp32[-1] < fp32[0] - 0.4, fp32  # it learns
    assert np.abs(bf16 - fp32).max() < 0.02, np.abs(bf16 - fp32)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_a_forward_with_the_same_weights_reuses_their_derived_copies(precision):
    """same_weights=True (evaluation's batches after the first) skips refreshing the
    transposed, bfloat16 and packed copies: with the parameters unchanged it gives the loss a
    fresh forward gives; after they change, only a refreshing forward sees the change."""
    reference, x, y, state = _setup(np.float32, "batch")
    net = Network("lstm", V, H, L, precision=precision)
    net.params.data[:] = reference.params.data
    fresh = net.forward(x, y, state.copy())
    assert net.forward(x, y, state.copy(), same_weights=True) == fresh
    net.params.data[:] *= 0.5
    assert net.forward(x, y, state.copy(), same_weights=True) == fresh  # the copies of before
    halved = net.forward(x, y, state.copy())
    assert halved != fresh
    assert net.forward(x, y, state.copy(), same_weights=True) == halved


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_every_buffer_the_products_read_starts_on_a_cache_line(precision):
    """The weights, their tiles or packed copies and the activations start on 64-byte
    boundaries (model.aligned_zeros), as AMX tile rows must not straddle cache lines; numpy's
    own large arrays start 16 bytes past one."""
    net = Network("lstm", V, 128, 2, precision=precision)
    x = np.zeros((8, 4), np.int32)
    net.forward(x, x, net.zero_state(4))
    arrays = [a for group in net.weights + net.acts + [net.transposed] for a in group
              if isinstance(a, np.ndarray) and a.size and a.dtype != np.uint8]
    arrays += [net.params.data, net.grads.data, net.rms]
    assert len(arrays) > 20
    assert [a.ctypes.data % 64 for a in arrays] == [0] * len(arrays)
    assert aligned_zeros((3, 5), np.uint16).shape == (3, 5) and not aligned_zeros(7, np.float32).any()
