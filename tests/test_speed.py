"""bench/speed.py --profile: per-kernel times that fit in the iteration; bench/sampling.py:
rates and the weight bytes each generated character reads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parent.parent / "bench" / "speed.py"


def test_profile_names_each_kernel_and_fits_in_the_iteration():
    T, B, H, V = 6, 8, 16, 10
    argv = [sys.executable, str(SPEED), "--no-torch", "--profile", "--json", "--threads", "2",
            "--rnn_size", str(H), "--num_layers", "2", "--batch_size", str(B), "--seq_length", str(T),
            "--vocab", str(V), "--iters", "5", "--warmup", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    profile = report["profile"]
    assert {"layer_forward", "layer_backward", "decoder_forward", "decoder_backward", "reduce_parts",
            "reduce_parts_transposed", "rmsprop_step"} <= set(profile)
    assert all(ms > 0 for ms in profile.values())
    iteration = report["phi_rnn"]["ms"]
    assert sum(profile.values()) <= sum(iteration) / len(iteration)
    assert 0 < report["phi_rnn"]["cpu_median_ms"] <= 2 * max(iteration)  # two threads at most
    from phi_rnn import gemm_choice
    assert report["gemm"].startswith(gemm_choice.default_backend())  # the run names its GEMM backend


def test_parts_are_measured_with_the_point_at_its_thread_count():
    def run(*extra):
        argv = [sys.executable, str(SPEED), "--no-torch", "--parts", "--json", "--threads", "2",
                "--rnn_size", "16", "--num_layers", "2", "--batch_size", "5", "--seq_length", "6",
                "--vocab", "10", "--iters", "2", "--warmup", "1", *extra]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["parts"]
    blocks = run()["contention"]  # batch strategy: 2 blocks of at most 3 of the 5 rows
    assert (blocks["blocks"], blocks["block_rows"]) == (2, 3)
    assert blocks["contention"] == blocks["together_ms"] / blocks["alone_ms"] and blocks["alone_ms"] > 0
    gemm = run("--strategy", "gemm")["gemm"]
    assert gemm["speedup"] == gemm["one_thread_ms"] / gemm["threaded_ms"] and gemm["threaded_ms"] > 0
    assert run("--threads", "1") == {}  # one block: nothing contends


SAMPLING = SPEED.parent / "sampling.py"


def test_sampling_bench_reports_rates_and_the_weights_each_character_reads():
    V, H, L = 30, 24, 3
    argv = [sys.executable, str(SAMPLING), "--no-torch", "--json", "--model", "gru", "--vocab", str(V),
            "--rnn_size", str(H), "--num_layers", str(L), "--chars", "3000", "--repeats", "3"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    G = 3 * H
    # one row of the one-hot table, every other weight once
    floats = G + (L - 1) * G * H + L * G * H + L * G + V * H + V
    assert report["weight_kb_per_char"] * 1024 == floats * 4
    rates = report["phi_rnn"]
    assert rates["min_chars_per_s"] <= rates["median_chars_per_s"] <= rates["max_chars_per_s"]
    assert abs(rates["us_per_char"] * rates["median_chars_per_s"] - 1e6) < 1e-3
    assert report["config"]["model"] == "gru" and report["threads"] == 1


def test_sampling_bench_times_bf16_beside_fp32_run_by_run():
    """--precision bf16 --with-fp32: both precisions' rates from the same runs, and the
    median of the runs' bf16 / fp32 time ratios between the lowest and the highest."""
    from phi_rnn import bf16
    if not bf16.native_features():
        pytest.skip(bf16.refusal())
    argv = [sys.executable, str(SAMPLING), "--no-torch", "--json", "--precision", "bf16", "--with-fp32",
            "--rnn_size", "32", "--chars", "3000", "--repeats", "3"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"]["precision"] == "bf16" and report["fp32"]["repeats"] == report["phi_rnn"]["repeats"] == 3
    q = report["bf16_over_fp32"]
    assert 0 < q["min"] <= q["median"] <= q["max"]
    # the median ratio lies between the ratios of the two sides' extreme rates
    bf, fp = report["phi_rnn"], report["fp32"]
    assert fp["min_chars_per_s"] / bf["max_chars_per_s"] <= q["max"] and \
        fp["max_chars_per_s"] / bf["min_chars_per_s"] >= q["min"]


def test_sampling_bench_rejects_bad_input_in_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_text("not a checkpoint")
    for argv, message in ((["--chars", "0"], "--chars must be positive, got 0"),
                          (["--checkpoint", str(corrupt)], "--checkpoint measures phi_rnn alone: add --no-torch"),
                          (["--checkpoint", str(corrupt), "--no-torch"], "is truncated or corrupt"),
                          (["--with-fp32"], "add --precision bf16")):
        result = subprocess.run([sys.executable, str(SAMPLING), *argv], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, argv
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sampling.py: error: ") and message in lines[0], lines


BACKENDS = SPEED.parent / "backends.py"
SMALL = ["--rnn_size", "32", "--batch_size", "8", "--seq_length", "10", "--vocab", "10", "--iters", "3",
         "--warmup", "1", "--rounds", "1", "--backends", "mkl"]


def run_backends(*argv, env=None):
    return subprocess.run([sys.executable, str(BACKENDS), *SMALL, *argv], capture_output=True, text=True,
                          timeout=600, env=env)


def hidden_bf16_env():
    """The environment in which phi_rnn finds no native bfloat16 on any CPU (phi_rnn/bf16.py)."""
    import os
    return {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}


def test_backends_bench_refuses_bad_precisions_in_one_line():
    float32_only = "--shapes and --cpu-time measure float32 only: leave bf16 out of --precisions"
    refusal = "--precision bf16 needs a CPU with native bfloat16 (avx512_bf16 or amx_bf16)"
    for argv, env, message in ((["--precisions", "fp16"], None, "--precisions 'fp16' unknown (choose from fp32, bf16)"),
                               (["--precisions", "fp32,bf16", "--shapes"], None, float32_only),
                               (["--precisions", "bf16", "--cpu-time"], None, float32_only),
                               (["--precisions", "bf16"], hidden_bf16_env(), refusal)):  # bf16 alone: refused
        result = run_backends("--no-torch", *argv, env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and not result.stdout, (argv, result.stderr)
        assert lines[0].startswith(f"backends.py: error: {message}"), lines
    result = run_backends("--no-torch", "--precisions", "fp32,bf16", env=hidden_bf16_env())  # next to fp32: a note
    assert result.returncode == 0, result.stderr
    assert f"backends.py: bf16 left out: {refusal}" in result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["mkl", "fp32"]]
    assert "bfloat16 CPU flags: " in result.stdout.splitlines()[1]


def test_backends_bench_puts_bf16_next_to_fp32_with_their_ratios():
    import importlib.util
    from phi_rnn import bf16
    if not bf16.native_features():
        pytest.skip(bf16.refusal())
    torch = importlib.util.find_spec("torch") is not None
    result = run_backends("--precisions", "fp32,bf16", *([] if torch else ["--no-torch"]))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[1]
    assert f"bfloat16 CPU flags: {' '.join(bf16.native_features())} (native)" in header
    assert " fp32 " in header and " bf16 " in header  # each floor with its precision
    rows = {tuple(line.split()[:2]): line for line in result.stdout.splitlines()[2:]}
    theirs = {("torch", "fp32"), ("torch", "bf16")} if torch else set()
    assert set(rows) == {("mkl", "fp32"), ("phi_rnn", "bf16")} | theirs
    ms = {row: float(line.split()[2]) for row, line in rows.items()}
    mine = rows["phi_rnn", "bf16"]
    assert "[bf16 gemm " in mine

    def ratio(line, label):  # the median of one round's ratio: that round's two times divided
        return float(line.split(f"/ {label} ")[1].split()[0])
    assert ratio(mine, "mkl fp32") == pytest.approx(ms["phi_rnn", "bf16"] / ms["mkl", "fp32"], rel=0.05, abs=0.02)
    if torch:
        assert ratio(mine, "torch bf16") == pytest.approx(ms["phi_rnn", "bf16"] / ms["torch", "bf16"],
                                                          rel=0.05, abs=0.02)
        assert ratio(rows["mkl", "fp32"], "torch fp32") == pytest.approx(ms["mkl", "fp32"] / ms["torch", "fp32"],
                                                                         rel=0.05, abs=0.02)
        assert "autocast" in rows["torch", "bf16"] and "autocast" not in rows["torch", "fp32"]
