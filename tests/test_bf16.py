"""bfloat16 (phi_rnn/bf16.py): rounding float32 to bfloat16 against ml_dtypes' and against
hand-made edge cases, widening back, the bfloat16 GEMM on each library against float64
products of the rounded operands, and the refusal where the CPU (as oneDNN sees it) has no
native bfloat16."""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from numba import njit

from phi_rnn import bf16
from phi_rnn import kernels as K
from phi_rnn.errors import UsageError

rng = np.random.default_rng(11)


def _bits(values):
    return np.asarray(values, np.uint32).view(np.float32)


def _reference_bits(values):
    """ml_dtypes' round-to-nearest-even bfloat16 of float32 `values`, as uint16 bits."""
    return values.astype(ml_dtypes.bfloat16).view(np.uint16)


def test_rounding_matches_ml_dtypes_on_every_kind_of_float():
    # Normal draws at many scales, and random bit patterns: every exponent, denormals, NaNs.
    values = np.concatenate([
        (rng.standard_normal(100_000) * 10.0 ** rng.integers(-30, 30, 100_000)).astype(np.float32),
        rng.integers(0, 2 ** 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ])
    got = bf16.to_bf16(values)
    finite_or_inf = ~np.isnan(values)
    np.testing.assert_array_equal(got[finite_or_inf], _reference_bits(values[finite_or_inf]))
    assert finite_or_inf.sum() < len(values)  # the draw holds NaNs


def test_ties_round_to_even_and_the_rest_to_nearest():
    # 1 + 2^-8 is halfway between 1 and the next bfloat16 (1 + 2^-7): to even, 1.
    cases = {
        0x3F808000: 0x3F80,  # tie, kept part even: down
        0x3F818000: 0x3F82,  # tie, kept part odd: up
        0x3F807FFF: 0x3F80,  # below half: down
        0x3F808001: 0x3F81,  # above half: up
        0xBF818000: 0xBF82,  # negative tie, odd: away from zero
        0x3FFF8000: 0x4000,  # the carry raises the exponent
    }
    got = bf16.to_bf16(_bits(list(cases)))
    np.testing.assert_array_equal(got, np.array(list(cases.values()), np.uint16))


def test_infinities_overflow_zeros_and_denormals():
    cases = {
        0x7F800000: 0x7F80,  # +inf
        0xFF800000: 0xFF80,  # -inf
        0x7F7FFFFF: 0x7F80,  # float32's largest: past bfloat16's, to inf
        0x7F7F8000: 0x7F80,  # tie above bfloat16's largest (odd): inf
        0x7F7F7FFF: 0x7F7F,  # just below: bfloat16's largest
        0xFF7FFFFF: 0xFF80,  # to -inf
        0x00000000: 0x0000,
        0x80000000: 0x8000,  # -0 keeps its sign
        0x00000001: 0x0000,  # smallest denormal: to zero
        0x00008000: 0x0000,  # denormal tie, even: down
        0x00018000: 0x0002,  # denormal tie, odd: up
        0x00012345: 0x0001,  # a denormal stays one
        0x007FFFFF: 0x0080,  # largest denormal rounds up to the smallest normal
    }
    got = bf16.to_bf16(_bits(list(cases)))
    np.testing.assert_array_equal(got, np.array(list(cases.values()), np.uint16))


def test_nan_stays_a_quiet_nan_with_its_sign_and_payload():
    nans = _bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF812345, 0x7FFFFFFF, 0x7F80FFFF])
    got = bf16.to_bf16(nans)
    wide = bf16.to_float32(got)
    assert np.isnan(wide).all()
    np.testing.assert_array_equal(np.signbit(wide), np.signbit(nans))
    np.testing.assert_array_equal(got, (nans.view(np.uint32) >> 16).astype(np.uint16) | 0x40)


def test_widening_is_exact_and_rounding_it_again_gives_it_back():
    every = np.arange(2 ** 16, dtype=np.uint16)
    wide = bf16.to_float32(every)
    reference = every.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(wide.view(np.uint32), reference.view(np.uint32))
    back = bf16.to_bf16(wide)
    is_nan = np.isnan(wide)
    np.testing.assert_array_equal(back[~is_nan], every[~is_nan])
    np.testing.assert_array_equal(back[is_nan], every[is_nan] | 0x40)  # signalling NaNs come back quiet


def test_two_dimensional_arrays_keep_their_shape():
    values = rng.standard_normal((37, 65)).astype(np.float32)
    got = bf16.to_bf16(values)
    assert got.shape == values.shape and got.dtype == np.uint16
    np.testing.assert_array_equal(got, _reference_bits(values))
    np.testing.assert_array_equal(bf16.to_float32(got), values.astype(ml_dtypes.bfloat16).astype(np.float32))


@njit(cache=True)
def _round_in_compiled_code(values, out):
    for i in range(values.shape[0]):
        out[i] = bf16.bf16_bits(values[i] * np.float32(2.0))


def test_the_scalar_rounding_runs_inside_compiled_kernels():
    values = rng.standard_normal(1000).astype(np.float32)
    out = np.empty(1000, np.uint16)
    _round_in_compiled_code(values, out)
    np.testing.assert_array_equal(out, _reference_bits(values * np.float32(2.0)))


# ---------------------------------------------------------------- the GEMM

# The LSTM's kinds of product: a step's state times the weights onto the gates (NN, beta 1,
# per-step rows), a step's gate gradients times the weights (NN, beta 0), the whole-sequence
# input projection and decoder (NN), the weight gradients x^T dG (TN), and the weights used
# transposed (NT, TT: one bfloat16 copy serving both directions).
PRODUCTS = [  # (trans_a, trans_b, m, n, k, beta)
    (False, False, 25, 512, 128, 1.0),
    (False, False, 50, 128, 512, 0.0),
    (False, False, 300, 512, 128, 0.0),
    (False, False, 300, 65, 128, 1.0),
    (True, False, 128, 512, 300, 0.0),
    (True, False, 65, 128, 300, 1.0),
    (False, True, 25, 128, 512, 0.0),
    (True, True, 64, 96, 80, 0.5),
    (True, False, 128, 512, 1, 0.0),  # the step-0 weight gradient of a one-row block
    (True, False, 65, 128, 3, 1.0),
    (False, False, 25, 128, 15, 0.0),
]


@pytest.fixture(params=bf16.BACKENDS)
def bf16_backend(request):
    if request.param not in bf16.available():
        pytest.fail(f"{request.param} not installed")
    with bf16.using(request.param):
        yield request.param


def _padded(rows, cols, pad):
    """A (rows, cols) view with contiguous rows `pad` elements apart beyond cols (a slice of a
    wider array, as the kernels pass the gates' column blocks)."""
    return rng.standard_normal((rows, cols + pad)).astype(np.float32)[:, :cols]


@pytest.mark.parametrize("product", PRODUCTS, ids=lambda p: "{}{} {}x{}x{} beta {}".format(
    "T" if p[0] else "N", "T" if p[1] else "N", *p[2:]))
@pytest.mark.parametrize("entry", ["library", "kernels"])
def test_gemm_matches_float64_products_of_the_rounded_operands(bf16_backend, product, entry):
    """The library's bfloat16 GEMM, and the kernels' gemm that runs it (or float32 on the
    widened operands where K is small: kernels.WIDEN_K)."""
    trans_a, trans_b, m, n, k, beta = product
    gemm = bf16.gemm_arrays if entry == "library" else K.gemm
    a32 = _padded(*((k, m) if trans_a else (m, k)), pad=3)
    b32 = _padded(*((n, k) if trans_b else (k, n)), pad=5)
    a = np.zeros((a32.shape[0], a32.shape[1] + 3), np.uint16)[:, :a32.shape[1]]  # keeps lda > cols
    b = np.zeros((b32.shape[0], b32.shape[1] + 5), np.uint16)[:, :b32.shape[1]]
    a[:] = bf16.to_bf16(a32)
    b[:] = bf16.to_bf16(b32)
    c_before = rng.standard_normal((m, n)).astype(np.float32) if beta else np.full((m, n), np.nan, np.float32)
    c_wide = np.zeros((m, n + 7), np.float32)
    c = c_wide[:, :n]
    c[:] = c_before

    gemm(trans_a, trans_b, 1.0, a, b, beta, c)

    op_a = bf16.to_float32(np.ascontiguousarray(a)).astype(np.float64)
    op_b = bf16.to_float32(np.ascontiguousarray(b)).astype(np.float64)
    op_a, op_b = (op_a.T if trans_a else op_a), (op_b.T if trans_b else op_b)
    expected = op_a @ op_b + (beta * c_before.astype(np.float64) if beta else 0.0)
    # float32 accumulation of exact bfloat16 products: within a few float32 roundings per
    # term of the magnitudes summed (unrounded operands would be off by ~2^-9 of them).
    scale = np.abs(op_a) @ np.abs(op_b) + (abs(beta) * np.abs(c_before) if beta else 0.0)
    error = np.abs(c - expected)
    assert (error <= 1e-5 * scale).all(), f"worst {np.max(error / scale):.2e} of the magnitudes summed"
    assert np.all(c_wide[:, n:] == 0.0)  # nothing written past the product's columns


def test_gemm_on_unrounded_operands_would_fail_the_bound():
    """The bound above tells bfloat16 operands from float32 ones: the check can fail."""
    a32 = rng.standard_normal((25, 128)).astype(np.float32)
    b32 = rng.standard_normal((128, 512)).astype(np.float32)
    c = np.zeros((25, 512), np.float32)
    bf16.gemm_arrays(False, False, 1.0, bf16.to_bf16(a32), bf16.to_bf16(b32), 0.0, c)
    error = np.abs(c - a32.astype(np.float64) @ b32.astype(np.float64))
    assert np.max(error / (np.abs(a32) @ np.abs(b32))) > 1e-4


def test_backend_names():
    assert bf16.libraries("mkl+onednn") == ("mkl", "onednn")
    assert bf16.libraries("onednn") == ("onednn", "onednn")
    with pytest.raises(ValueError, match="unknown bfloat16 GEMM backend"):
        bf16.set_backend("openblas")
    chosen = bf16.backend()
    with bf16.using("mkl+onednn"):
        assert bf16.backend() == "mkl+onednn"
    assert bf16.backend() == chosen


def test_the_measurement_runs_the_products_on_bfloat16_operands():
    """gemm_choice's products with precision bf16: each call's C is its own bfloat16 A[i] B
    (uint16 operands, float32 C) + beta C0[i], on the dispatcher's library."""
    from phi_rnn import blas, gemm_choice
    products = gemm_choice.MEASURED_PRODUCTS
    operands = gemm_choice.measurement_operands(products, np.random.default_rng(4), "bf16")
    before = [c.copy() for _, _, c in operands]
    with blas.one_thread(), bf16.using(bf16.available()[0]):
        gemm_choice.run_products(products, operands)
    for (calls, trans_a, m, n, k, beta), (a, b, c), c0 in zip(products, operands, before):
        assert a.dtype == b.dtype == np.uint16 and c.dtype == np.float32
        product = np.einsum("skm,kn->smn" if trans_a else "smk,kn->smn", bf16.to_float32(a).astype(np.float64),
                            bf16.to_float32(b).astype(np.float64))
        np.testing.assert_allclose(c, product + beta * c0, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_bf16_rates_are_measured_per_library_and_leave_the_backend_as_it_was():
    from phi_rnn import gemm_choice
    chosen = bf16.backend()
    rates = gemm_choice.measure_rates(bf16.available(), rounds=1, precision="bf16")
    assert set(rates) == set(bf16.available())
    assert all(set(r) == {"step", "sequence"} and min(r.values()) > 0 for r in rates.values())
    assert bf16.backend() == chosen


def test_the_bf16_default_is_measured_once_per_machine_kept_apart_and_named(tmp_path):
    """The first process measures the bfloat16 libraries and keeps their rates under a key of
    their own beside the float32 one; the next takes the choice from the file (edited here
    to make oneDNN the fastest where it is present); describe_backend names the choice."""
    import json
    from phi_rnn import gemm_choice
    code = ("from phi_rnn import bf16, gemm_choice; import json; gemm_choice.use_default(); "
            "gemm_choice.use_default('bf16'); print(json.dumps([bf16.backend(), bf16.describe_backend()]))")

    def run():
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    backend, described = run()
    kept = json.loads((tmp_path / "phi_rnn" / "gemm_backend.json").read_text())
    keys = [key for key in kept if key.startswith(gemm_choice.MEASUREMENT + " bf16;")]
    if len(bf16.available()) == 1:  # MKL alone: nothing to measure
        assert keys == [] and backend == "mkl" and "the only library present" in described
        return
    (key,) = keys
    assert len(kept) == 2  # beside the float32 libraries' entry
    assert backend == gemm_choice.choose(kept[key]["rates"]) and described.startswith(backend + ": ")
    assert "fastest here" in described
    kept[key]["rates"] = {"onednn": {"step": 2.0, "sequence": 2.0}, "mkl": {"step": 1.0, "sequence": 1.0}}
    (tmp_path / "phi_rnn" / "gemm_backend.json").write_text(json.dumps(kept))
    assert run()[0] == "onednn"


def test_default_backend_is_mkl_with_amx_and_onednn_without(monkeypatch):
    monkeypatch.setattr(bf16, "native_features", lambda: ("avx512_bf16", "amx_bf16"))
    assert bf16.default_backend() == "mkl"
    monkeypatch.setattr(bf16, "native_features", lambda: ("avx512_bf16",))
    assert bf16.default_backend() == ("onednn" if "onednn" in bf16.available() else "mkl")


# ---------------------------------------------------------------- native bfloat16 or refusal

_PROBE = ("from phi_rnn import bf16\n"
          "print(','.join(bf16.native_features()))\n"
          "try:\n"
          "    bf16.require_native()\n"
          "except bf16.UsageError as e:\n"
          "    print(f'phi_rnn: error: {e}')\n")


def _probe(isa_cap):
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa_cap:
        env["ONEDNN_MAX_CPU_ISA"] = isa_cap
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    features, *refusal = result.stdout.splitlines()
    return tuple(filter(None, features.split(","))), refusal


REFUSAL = ("phi_rnn: error: --precision bf16 needs a CPU with native bfloat16 (avx512_bf16 or amx_bf16); "
           "this CPU has neither")


@pytest.mark.parametrize("isa_cap", ["AVX2", "AVX512_CORE"])
def test_a_cpu_capped_below_bfloat16_is_refused_in_one_line(isa_cap):
    features, refusal = _probe(isa_cap)
    assert features == ()
    assert len(refusal) == 1 and refusal[0].startswith(REFUSAL)
    hidden = [f for f in bf16.NATIVE_FEATURES if f in bf16.cpu_flags()]
    if hidden:  # the CPU has them: the line says what hides them
        assert f"ONEDNN_MAX_CPU_ISA={isa_cap} hides its {' and '.join(hidden)}" in refusal[0]


def test_uncapped_the_cpu_flags_decide():
    flags = bf16.cpu_flags()
    features, refusal = _probe(None)
    assert features == tuple(f for f in bf16.NATIVE_FEATURES if f in flags)
    assert bool(refusal) == (not features)


def test_capped_at_avx512_bf16_amx_is_hidden():
    features, _ = _probe("AVX512_CORE_BF16")
    assert features == (("avx512_bf16",) if "avx512_bf16" in bf16.cpu_flags() else ())


def test_require_native_in_this_process():
    if bf16.native_features():
        bf16.require_native()
    else:
        with pytest.raises(UsageError, match="needs a CPU with native bfloat16"):
            bf16.require_native()


@pytest.mark.parametrize("trans_b", [False, True], ids=["B", "B^T"])
@pytest.mark.parametrize("m", [25, 300])
def test_products_on_weights_packed_once_match_the_unpacked_gemm(trans_b, m):
    """MKL's B laid out once (the weights, per update) serves every product of m rows, with
    the results of the unpacked bfloat16 GEMM's bound."""
    n, k = 512, 128
    a = bf16.to_bf16(rng.standard_normal((m, k)))
    b = bf16.to_bf16(rng.standard_normal((n, k) if trans_b else (k, n)))
    packed = bf16.packed_operand(m, n, k)
    bf16.pack_into(trans_b, b, m, packed)
    op_a = bf16.to_float32(a).astype(np.float64)
    op_b = bf16.to_float32(b).astype(np.float64)
    op_b = op_b.T if trans_b else op_b
    for beta in (0.0, 1.0):  # the same packing twice: packing does not wear out
        c_before = rng.standard_normal((m, n)).astype(np.float32)
        c = c_before.copy()
        bf16.gemm_packed_arrays(False, 1.0, a, packed, beta, c)
        error = np.abs(c - (op_a @ op_b + beta * c_before))
        assert (error <= 1e-5 * (np.abs(op_a) @ np.abs(op_b) + beta * np.abs(c_before))).all()


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bf16_gemm.py")


def test_the_benchmark_times_every_product_on_every_library():
    result = subprocess.run([sys.executable, BENCH, "--rounds", "1", "--min-ms", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    sys.path.insert(0, os.path.dirname(BENCH))
    import bf16_gemm
    for name, calls, trans_a, *_ in bf16_gemm.PRODUCTS:
        cells = rows[name].split()
        assert cells.count("-") == (2 if trans_a else 0)  # packing (time, ratio) serves products on the weights
    assert "CPU flags:" in result.stdout and "round gates" in result.stdout and "pack W_hh" in result.stdout


def test_the_benchmark_refuses_bad_flags_in_one_line():
    result = subprocess.run([sys.executable, BENCH, "--rounds", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("phi_rnn") and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- --precision bf16 through the CLI

needs_bf16 = pytest.mark.skipif(not bf16.native_features(), reason=bf16.refusal())


@pytest.mark.parametrize("command", ["train", "sample"])
def test_the_cli_refuses_bf16_on_a_cpu_capped_below_it(tmp_path, command):
    from cli_helpers import TINY_MODEL, one_line_error, run_cli, small_corpus
    if command == "train":
        args = ["train", "--data_dir", small_corpus(tmp_path / "data", 3000), *TINY_MODEL, "--max_iters", 2,
                "--checkpoint_dir", tmp_path / "cv"]
    else:
        args = ["sample", tmp_path / "no-such.npz"]
    result = run_cli(*args, "--precision", "bf16", env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert result.returncode == 2
    assert one_line_error(result).startswith(REFUSAL)
    assert not (tmp_path / "cv").exists()


@needs_bf16
@pytest.mark.parametrize("rnn_size", [16, 32])  # 32: the per-step products fit AMX tiles where there are some
def test_bf16_resume_is_bit_identical_and_the_checkpoint_serves_either_precision(tmp_path, rnn_size):
    from cli_helpers import run_cli, small_corpus, train_losses
    from phi_rnn import amx
    from phi_rnn import checkpoint
    corpus = small_corpus(tmp_path / "data", 12000)
    common = ["--data_dir", corpus, "--rnn_size", rnn_size, "--num_layers", 2, "--batch_size", 8, "--seq_length", 16,
              "--dropout", 0.25, "--eval_val_every", 30, "--print_every", 1, "--precision", "bf16"]
    straight = run_cli("train", *common, "--max_iters", 60, "--checkpoint_dir", tmp_path / "a", check=True)
    first = run_cli("train", *common, "--max_iters", 30, "--checkpoint_dir", tmp_path / "b", check=True)
    second = run_cli("train", *common, "--max_iters", 60, "--resume", "latest", "--checkpoint_dir", tmp_path / "b",
                     check=True)
    assert "gemm bfloat16: " in straight.stdout
    kernel = "phi_rnn's AMX tile kernel" if amx.available() and rnn_size == 32 else "MKL's packed product"
    assert f"LSTM per-step products: {kernel}" in straight.stdout
    assert train_losses(first.stdout) + train_losses(second.stdout) == train_losses(straight.stdout)
    a = checkpoint.load(checkpoint.resolve("latest", str(tmp_path / "a")))
    b = checkpoint.load(checkpoint.resolve("latest", str(tmp_path / "b")))
    for name in a.params:
        assert a.params[name].dtype == np.float32
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    np.testing.assert_array_equal(a.arrays["optim.rms"], b.arrays["optim.rms"])
    assert a.meta["options"]["precision"] == "bf16"
    path = checkpoint.resolve("latest", str(tmp_path / "a"))
    texts = {p: run_cli("sample", path, "--length", 300, "--precision", p, check=True).stdout for p in ("fp32", "bf16")}
    assert all(len(t) == 301 for t in texts.values())
    # the same draws through slightly different logits: mostly the same characters
    assert sum(x == y for x, y in zip(*texts.values())) > 150
    fp32 = run_cli("train", *common[:-2], "--max_iters", 70, "--resume", "latest", "--checkpoint_dir",
                   tmp_path / "a", check=True)  # and it resumes in float32
    assert len(train_losses(fp32.stdout)) == 10
