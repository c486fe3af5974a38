"""The batch-of-one bfloat16 product on vdpbf16ps (phi_rnn/bf16_dot.py): the pair-interleaved
layout and its round trip, the product against float64 products of the bfloat16-rounded
operands (full and partial column blocks, odd K, column slices, beta), checks that the bound
can fail (unrounded operands, the pairs' halves swapped), the compiled instructions, the
numba cache across processes, and generation on it (and without it, on the widening product)."""
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from phi_rnn import bf16, bf16_dot

pytestmark = pytest.mark.skipif(not bf16_dot.available(), reason="this CPU has no avx512_bf16")

rng = np.random.default_rng(5)

# (K, N): the char-rnn products (128 x 512, the decoder's 128 x 65), wider ones, odd K, N
# not a multiple of 16 in every remainder width (1..8 vectors), N < 16, K in several slices
# (bf16_dot.ROW_SLICE pairs) with a last one of a single pair
SHAPES = [(128, 512), (256, 512), (512, 2048), (128, 65), (129, 65), (1, 1), (3, 7), (33, 15), (64, 16),
          (65, 129), (17, 250), (100, 127), (2, 200), (31, 100), (257, 70)]


def _rounded(values):
    """The float64 values of float32 `values` rounded to bfloat16."""
    return bf16.to_float32(bf16.to_bf16(values)).astype(np.float64)


def _product(x, w, beta, c_before):
    """row_product on fresh pairs of w: c (1, N) and, past its last column, what it left
    of a guard band (NaN padding would show as written)."""
    n = w.shape[1]
    c_wide = np.full((1, n + 9), np.nan, np.float32)
    c = c_wide[:, :n]
    c[:] = c_before
    bf16_dot.row_product(x, bf16_dot.pair_rows(w), np.float32(beta), c)
    return c, c_wide[:, n:]


def _relative_error(c, x, w, beta, c_before):
    """max |c - exact| / (the magnitudes summed), exact the float64 product of the rounded
    operands."""
    xr, wr = _rounded(x), _rounded(w)
    expected = xr @ wr + (beta * c_before.astype(np.float64) if beta else 0.0)
    scale = np.abs(xr) @ np.abs(wr) + (abs(beta) * np.abs(c_before) if beta else 0.0)
    return np.max(np.abs(c - expected) / np.maximum(scale, np.finfo(np.float32).tiny))


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize("k", [1, 2, 7, 128, 129])
def test_pairs_hold_the_even_row_low_and_unpair_back(k):
    w = rng.standard_normal((k, 37)).astype(np.float32)
    w2 = bf16_dot.pair_rows(w)
    bits = bf16.to_bf16(w)
    assert w2.dtype == np.uint32 and w2.shape == ((k + 1) // 2, 37) and w2.flags.c_contiguous
    np.testing.assert_array_equal(w2[:, :] & 0xFFFF, bits[0::2])
    np.testing.assert_array_equal(w2[: k // 2] >> 16, bits[1::2])
    if k % 2:
        assert np.all(w2[-1] >> 16 == 0)  # the padding row is +0
    np.testing.assert_array_equal(bf16_dot.unpair_rows(w2, k), bits)


def test_stacked_layers_pair_each_layer():
    w = rng.standard_normal((3, 9, 20)).astype(np.float32)
    w2 = bf16_dot.pair_rows(w)
    assert w2.shape == (3, 5, 20)
    for layer in range(3):
        np.testing.assert_array_equal(w2[layer], bf16_dot.pair_rows(w[layer]))
    np.testing.assert_array_equal(bf16_dot.unpair_rows(w2, 9), bf16.to_bf16(w))


# ---------------------------------------------------------------- the product

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_product_matches_float64_products_of_the_rounded_operands(shape, beta):
    k, n = shape
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    c_before = rng.standard_normal((1, n)).astype(np.float32) if beta else np.full((1, n), np.nan, np.float32)
    c, guard = _product(x, w, beta, c_before)
    # float32 accumulation of exact bfloat16 products: within a few float32 roundings per
    # term of the magnitudes summed (unrounded operands would be off by ~2^-9 of them)
    assert _relative_error(c, x, w, beta, c_before) <= 1e-5
    assert np.isnan(guard).all()  # nothing written past the product's columns


def test_unrounded_operands_would_fail_the_bound():
    """The bound above tells bfloat16 operands from float32 ones: the check can fail."""
    x = rng.standard_normal((1, 128)).astype(np.float32)
    w = rng.standard_normal((128, 512)).astype(np.float32)
    c, _ = _product(x, w, 0.0, np.zeros((1, 512), np.float32))
    error = np.abs(c - x.astype(np.float64) @ w.astype(np.float64))
    assert np.max(error / (np.abs(x) @ np.abs(w))) > 1e-4


def test_swapped_halves_would_fail_the_bound():
    """The pairs' order matters: with each pair's halves swapped (odd k low) the product is
    another one."""
    x = rng.standard_normal((1, 128)).astype(np.float32)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    w2 = bf16_dot.pair_rows(w)
    swapped = (w2 << np.uint32(16)) | (w2 >> np.uint32(16))
    c = np.zeros((1, 64), np.float32)
    bf16_dot.row_product(x, swapped, np.float32(0.0), c)
    assert _relative_error(c, x, w, 0.0, c) > 1e-2


def test_column_slices_of_the_pairs_and_of_c():
    """The GRU's step multiplies by column blocks of w_hh_t into column blocks of the gates:
    rows with a stride wider than the product."""
    k, h = 96, 40
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = rng.standard_normal((k, 3 * h)).astype(np.float32)
    w2 = bf16_dot.pair_rows(w)
    gates = np.zeros((1, 3 * h), np.float32)
    bf16_dot.row_product(x, w2[:, 2 * h:3 * h], np.float32(1.0), gates[:, 2 * h:3 * h])
    bf16_dot.row_product(x, w2[:, 0:2 * h], np.float32(1.0), gates[:, 0:2 * h])
    assert _relative_error(gates, x, w, 0.0, gates) <= 1e-5


def test_mismatched_shapes_are_refused():
    x = np.ones((1, 10), np.float32)
    c = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="shapes"):
        bf16_dot.row_product(x, np.zeros((6, 8), np.uint32), np.float32(0.0), c)
    with pytest.raises(ValueError, match="shapes"):
        bf16_dot.row_product(x, np.zeros((5, 9), np.uint32), np.float32(0.0), c)


def test_the_loop_runs_on_vdpbf16ps():
    """The compiled loop is the instruction itself (a weight load folded into it), x is rounded
    by vcvtneps2bf16, and no weight is widened in software."""
    from numba import njit
    product = njit(error_model="numpy")(bf16_dot.row_product.py_func)  # uncached: its assembly
    product(np.ones((1, 4), np.float32), np.zeros((2, 3), np.uint32), np.float32(0.0), np.zeros((1, 3), np.float32))
    asm = "\n".join(product.inspect_asm().values())
    assert re.search(r"vdpbf16ps\t-?\d*\(", asm)
    assert "vcvtneps2bf16" in asm
    assert "vpslld" not in asm  # the software widening's shift


def test_a_second_process_loads_the_product_from_the_cache(tmp_path):
    script = textwrap.dedent("""
        import numpy as np
        from phi_rnn import bf16_dot
        c = np.zeros((1, 65), np.float32)
        bf16_dot.row_product(np.ones((1, 128), np.float32), np.zeros((64, 65), np.uint32), np.float32(0.0), c)
        stats = bf16_dot.row_product.stats
        print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    assert runs[0].stdout.split() == ["0", "1"]  # compiled and saved
    assert runs[1].stdout.split() == ["1", "0"]  # loaded


# ---------------------------------------------------------------- generation on it

@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
def test_bf16_generation_runs_on_the_pairs_and_follows_the_float32_network(model):
    """Generator with precision bf16 multiplies on the pairs (uint32 weights); its argmax
    text, replayed through the float32 training network, is that network's argmax at almost
    every step (bfloat16 weights move the logits slightly). GRU covers the column blocks."""
    from generation_helpers import argmax_agreement, network_and_checkpoint
    from phi_rnn.sample import Generator
    rng = np.random.default_rng(0)
    # 70 symbols, 40 units: N not a multiple of 16 in every product. A sharper distribution
    # than at init; sharper still, the vanilla RNN turns chaotic and any rounding (the
    # widening product's too) sends it elsewhere
    net, ck = network_and_checkpoint(model, 70, 40, 2, 3.0, rng)
    gen = Generator(ck, "bf16")
    assert gen.weights.w_hh_t.dtype == gen.weights.w_ih_t.dtype == gen.weights.dec_w_t.dtype == np.uint32
    assert argmax_agreement(gen, net, rng) > 0.9


def test_without_avx512_bf16_generation_keeps_the_widening_product(monkeypatch):
    """A CPU with amx_bf16 alone (or numba compiling for a CPU without avx512_bf16) samples on
    plain bfloat16 bits (uint16), widened in software."""
    from phi_rnn import checkpoint, sample
    from phi_rnn.model import Network
    net = Network("lstm", 20, 24, 2)
    net.init_params(np.random.default_rng(1))
    ck = checkpoint.Checkpoint("memory", {k: v.copy() for k, v in net.params.views.items()},
                               {"model": "lstm", "num_layers": 2, "rnn_size": 24, "vocab": list(range(60, 80))}, {})
    monkeypatch.setattr(bf16_dot, "available", lambda: False)
    gen = sample.Generator(ck, "bf16")
    assert gen.weights.w_hh_t.dtype == gen.weights.dec_w_t.dtype == np.uint16
    text = "".join(gen.generate(50, 1.0, False, np.random.default_rng(2)))
    assert len(text) == 50 and set(text) <= {chr(c) for c in range(60, 80)}
