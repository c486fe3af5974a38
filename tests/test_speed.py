"""bench/speed.py --profile: per-kernel times that account for the iteration."""
import json
import subprocess
import sys
from pathlib import Path

SPEED = Path(__file__).resolve().parent.parent / "bench" / "speed.py"


def test_profile_names_each_kernel_and_gemm_shape_and_fits_in_the_iteration():
    T, B, H, V = 6, 8, 16, 10
    argv = [sys.executable, str(SPEED), "--no-torch", "--profile", "--json", "--threads", "2",
            "--rnn_size", str(H), "--num_layers", "2", "--batch_size", str(B), "--seq_length", str(T),
            "--vocab", str(V), "--iters", "5", "--warmup", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    profile = report["profile"]
    G, rows = 4 * H, T * B
    assert {"forward_parallel", "backward_parallel", "rmsprop_step", "log_softmax_nll",
            f"gemm {rows} x {G} x {H} (B^T)",   # layer 2's input projection over all steps
            f"gemm {G} x {H} x {rows} (A^T)",   # its weight gradients
            f"gemm {rows} x {V} x {H} (B^T)",   # the decoder
            } <= set(profile)
    assert all(ms > 0 for ms in profile.values())
    iteration = report["phi_rnn"]["ms"]
    assert sum(profile.values()) <= sum(iteration) / len(iteration)
