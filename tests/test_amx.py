"""The AMX per-step product (phi_rnn.amx) against float64 products of the same bfloat16
operands, and its place in bfloat16 LSTM training: the same steps as MKL's packed product."""
import numpy as np
import pytest

from phi_rnn import amx, bf16, bf16_dot

pytestmark = pytest.mark.skipif(not amx.available(), reason="no AMX bf16 tiles here (CPU, numba target or OS)")

# (M, N, K): char-rnn's per-step shapes at 1 and 2 threads, forward and backward; a batch of
# one; row counts that leave a short last tile, fill a group of 64 exactly, and span groups
SHAPES = [(25, 512, 128), (50, 512, 128), (25, 128, 512), (50, 128, 512), (1, 16, 32), (17, 48, 64),
          (33, 16, 32), (64, 32, 96), (70, 64, 64), (130, 32, 32), (7, 512, 128)]


def _bf16_operands(rng, m, n, k):
    a = bf16.to_bf16(rng.standard_normal((m, k)).astype(np.float32))
    w = bf16.to_bf16(rng.standard_normal((k, n)).astype(np.float32))
    tiles = np.zeros(amx.tiles_shape(k, n), np.uint32)
    amx.tile_into(w, tiles)
    return a, w, tiles


def _exact(a_bits, w_bits):
    return bf16.to_float32(a_bits).astype(np.float64) @ bf16.to_float32(w_bits).astype(np.float64)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_tile_product_matches_float64(m, n, k, beta):
    rng = np.random.default_rng(m * 1000 + n + k)
    a, w, tiles = _bf16_operands(rng, m, n, k)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32) if beta == 0 else c0.copy()  # beta 0: c is not read
    amx.tile_product(a, tiles, beta, c)
    expected = _exact(a, w) + beta * c0
    # float32 accumulation of exact bfloat16 products: relative error of a float32 sum of k terms
    scale = np.abs(bf16.to_float32(a)).astype(np.float64) @ np.abs(bf16.to_float32(w)).astype(np.float64)
    assert np.all(np.abs(c - expected) <= 4 * k * np.finfo(np.float32).eps * (scale + np.abs(c0)))


@pytest.mark.parametrize("m,n,ka,kb", [(25, 512, 128, 128), (50, 512, 128, 128), (3, 64, 32, 96)])
def test_tile_product_sum_matches_float64(m, n, ka, kb):
    """A layer's gates from its input and its previous h in one pass: c is not read."""
    rng = np.random.default_rng(m + n + ka + kb)
    a, wa, tiles_a = _bf16_operands(rng, m, n, ka)
    b, wb, tiles_b = _bf16_operands(rng, m, n, kb)
    c = np.full((m, n), np.nan, np.float32)
    amx.tile_product_sum(a, tiles_a, b, tiles_b, c)
    np.testing.assert_allclose(c, _exact(a, wa) + _exact(b, wb), rtol=1e-5, atol=1e-4)


def test_tile_product_rows_of_a_wider_array():
    """C as rows of a wider array (a step's gates inside the time-major buffer): columns past
    N are untouched."""
    rng = np.random.default_rng(3)
    a, w, tiles = _bf16_operands(rng, 25, 64, 32)
    wide = rng.standard_normal((25, 96)).astype(np.float32)
    before = wide.copy()
    amx.tile_product(a, tiles, 1.0, wide[:, :64])
    np.testing.assert_array_equal(wide[:, 64:], before[:, 64:])
    np.testing.assert_allclose(wide[:, :64], _exact(a, w) + before[:, :64], rtol=1e-5, atol=1e-4)


def test_tile_layout_holds_every_weight_once():
    """tile_into is a permutation of the pairs: every bfloat16 weight appears once, in the
    half its row's parity says."""
    rng = np.random.default_rng(4)
    k, n = 64, 48
    w = bf16.to_bf16(rng.standard_normal((k, n)).astype(np.float32))
    tiles = np.zeros(amx.tiles_shape(k, n), np.uint32)
    amx.tile_into(w, tiles)
    j, s, r, col = 1, 1, 5, 7  # tile column 1, K step 1, pair row 5, column 7
    pair = tiles[j, s, r, col]
    k2, nn = s * amx.TILE_ROWS + r, j * amx.TILE_ROWS + col
    assert pair & 0xFFFF == w[2 * k2, nn] and pair >> 16 == w[2 * k2 + 1, nn]
    low = np.sort((tiles & 0xFFFF).astype(np.uint16).ravel())
    high = np.sort((tiles >> 16).astype(np.uint16).ravel())
    np.testing.assert_array_equal(low, np.sort(w[0::2].ravel()))
    np.testing.assert_array_equal(high, np.sort(w[1::2].ravel()))


def test_round_and_tile_is_round_into_and_tile_into_in_one_pass():
    """An update's operands in one parallel pass: values rounded as round_into does (a length
    past one chunk and not a multiple of it), weights tiled from float32 as tile_into tiles
    their rounded bits."""
    rng = np.random.default_rng(5)
    values = tuple(rng.standard_normal(size).astype(np.float32) for size in (bf16.ROUND_CHUNK + 77, 300))
    rounded = tuple(np.zeros(v.shape, np.uint16) for v in values)
    weights = tuple(rng.standard_normal(shape).astype(np.float32) for shape in ((64, 48), (32, 512)))
    tiles = tuple(np.zeros(amx.tiles_shape(*w.shape), np.uint32) for w in weights)
    amx.round_and_tile(values, rounded, weights, tiles, amx.task_list(values, tiles))
    for v, r in zip(values, rounded):
        np.testing.assert_array_equal(r, bf16.to_bf16(v))
    for w, t in zip(weights, tiles):
        expected = np.zeros_like(t)
        amx.tile_into(bf16.to_bf16(w), expected)
        np.testing.assert_array_equal(t, expected)


@pytest.mark.parametrize("bad", ["k", "beta", "strided"])
def test_tile_product_refuses(bad):
    rng = np.random.default_rng(5)
    a, _, tiles = _bf16_operands(rng, 4, 32, 64)
    c = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError):
        if bad == "k":
            amx.tile_product(a[:, :32], tiles, 1.0, c)
        elif bad == "beta":
            amx.tile_product(a, tiles, 0.5, c)
        else:
            amx.tile_product(a, tiles, 1.0, np.zeros((4, 64), np.float32)[:, ::2])


def test_fits():
    assert amx.fits(25, 512, 128) and amx.fits(50, 128, 512)
    assert not amx.fits(25, 500, 128) and not amx.fits(25, 512, 100)


def _train(precision_net, batch, steps=3):
    """Losses and final gradients of `steps` bfloat16 iterations of a 2 x 128 LSTM."""
    net = precision_net
    net.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    state = net.zero_state(batch)
    losses = []
    for _ in range(steps):
        x = rng.integers(0, 65, (20, batch)).astype(np.int32)
        y = rng.integers(0, 65, (20, batch)).astype(np.int32)
        losses.append(net.forward(x, y, state))
        net.backward(x, False)
        grads = net.grads.data.copy()
        net.update(2e-3, 0.95, 5.0)
    return np.array(losses), grads, net.params.data.copy()


@pytest.mark.parametrize("batch", [25, 4])
def test_training_on_tiles_matches_mkl_packed(monkeypatch, batch):
    """bfloat16 LSTM iterations with the per-step products on AMX tiles and on MKL's packed
    product: the same losses, gradients and updated weights to float32 summation order. The
    upper layer's input projection runs on tiles step by step with 25 rows, over all steps
    at once with 4 (kernels.input_per_step)."""
    from phi_rnn import kernels
    from phi_rnn.model import Network
    tiles_net = Network("lstm", 65, 128, 2, precision="bf16")
    assert tiles_net.packed[0][0].dtype == np.uint32  # the tile kernel runs the steps
    assert tiles_net.packed[1][2].dtype == np.uint32  # and the upper layer's input projection
    assert kernels.input_per_step(False, tiles_net.weights[1], batch) == (batch >= amx.TILE_ROWS)
    on_tiles = _train(tiles_net, batch)
    monkeypatch.setattr(amx, "available", lambda: False)
    mkl_net = Network("lstm", 65, 128, 2, precision="bf16")
    assert mkl_net.packed[0][0].dtype == np.uint8
    on_mkl = _train(mkl_net, batch)
    np.testing.assert_allclose(on_tiles[0], on_mkl[0], rtol=1e-5)
    scale = np.abs(on_mkl[1]).max()
    assert np.abs(on_tiles[1] - on_mkl[1]).max() < 1e-3 * scale
    np.testing.assert_allclose(on_tiles[2], on_mkl[2], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- a batch of one (generation)

@pytest.mark.parametrize("n,k", [(512, 128), (16, 32), (48, 224), (1024, 256), (64, 416)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_row_product_matches_float64(n, k, beta):
    """One float32 row, rounded to bfloat16 by the kernel, times W's tiles: K of 1 to 13 steps
    (more than the A tiles held at once: 224, 256 and 416 take two and three passes over C)."""
    if not bf16_dot.available():
        pytest.skip("the row is rounded by vcvtneps2bf16 (avx512_bf16)")
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((1, k)).astype(np.float32)
    _, w, tiles = _bf16_operands(rng, 1, n, k)
    c0 = rng.standard_normal((1, n)).astype(np.float32)
    c = np.full((1, n), np.nan, np.float32) if beta == 0 else c0.copy()
    amx.row_product(x, tiles, beta, c)
    expected = _exact(bf16.to_bf16(x), w) + beta * c0
    scale = np.abs(bf16.to_float32(bf16.to_bf16(x))).astype(np.float64) @ np.abs(bf16.to_float32(w))
    assert np.all(np.abs(c - expected) <= 4 * k * np.finfo(np.float32).eps * (scale + np.abs(c0)))


@pytest.mark.parametrize("bad", ["k", "rows", "beta"])
def test_row_product_refuses(bad):
    rng = np.random.default_rng(6)
    _, _, tiles = _bf16_operands(rng, 1, 32, 64)
    x, c = np.zeros((1, 64), np.float32), np.zeros((1, 32), np.float32)
    with pytest.raises(ValueError):
        if bad == "k":
            amx.row_product(x[:, :32], tiles, 1.0, c)
        elif bad == "rows":
            amx.row_product(np.zeros((2, 64), np.float32), tiles, 1.0, np.zeros((2, 32), np.float32))
        else:
            amx.row_product(x, tiles, 0.5, c)


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
def test_bf16_generation_on_tiles_follows_the_float32_network(model):
    """With AMX, a bf16 LSTM Generator whose layers fit the tiles (H a multiple of 32)
    multiplies them on tiles (the decoder, 70 symbols, on vdpbf16ps pairs); a GRU and an RNN,
    whose steps are training's functions, keep the pairs. The argmax text, replayed through
    the float32 training network, is that network's argmax at almost every step."""
    if not bf16_dot.available():
        pytest.skip("no avx512_bf16")
    from generation_helpers import argmax_agreement, network_and_checkpoint
    from phi_rnn.sample import Generator
    rng = np.random.default_rng(0)
    # sharper than at init; sharper still, three layers turn chaotic
    net, ck = network_and_checkpoint(model, 70, 64, 3, 2.0, rng)
    gen = Generator(ck, "bf16")
    on_tiles = model == "lstm"
    assert gen.weights.w_hh_t.ndim == gen.weights.w_ih_t.ndim == (5 if on_tiles else 3)
    assert gen.weights.dec_w_t.ndim == 2 and gen.weights.dec_w_t.dtype == np.uint32
    assert gen.weights.w_hh_t.ctypes.data % 64 == 0
    assert argmax_agreement(gen, net, rng) > 0.9
