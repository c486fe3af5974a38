"""One config, side by side: phi_rnn's training iteration vs PyTorch's nn.LSTM (oneDNN) when
torch is importable, each in its own process with the same thread count, plus this
machine's sgemm peak measured in the same run.

    python bench/speed.py                       # char-rnn config, all cores
    python bench/speed.py --threads 1 --iters 50
    python bench/speed.py --rnn_size 512 --num_layers 3 --batch_size 128 --seq_length 100
    python bench/speed.py --json                # one JSON object (the scaling study reads it)
    python bench/speed.py --no-torch --profile  # where phi_rnn's iteration spends its time
    python bench/speed.py --precision bf16      # bfloat16 mixed precision (PyTorch: autocast bfloat16)

Prints median / min / max ms per iteration (forward + backward + RMSprop, as in training),
chars/s, GEMM GFLOP/s, % of the sgemm peak, peak RSS, and the ratio phi_rnn / PyTorch.
It is also the scaling study's worker (bench/scale): every point is one run of it with
`--json --profile --parts`.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.side_by_side import (TorchSide, finish, machine_record, peak_rss_mb, print_machine,  # noqa: E402
                                print_sides, run_worker, versions)
from phi_rnn import affinity  # noqa: E402  (light: starts no runtime)
from phi_rnn.cells import MODELS  # noqa: E402  (light too)
from phi_rnn.errors import UsageError  # noqa: E402
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lstm", choices=MODELS)
    p.add_argument("--rnn_size", "--rnn-size", type=int, default=128)
    p.add_argument("--num_layers", "--num-layers", type=int, default=2)
    p.add_argument("--batch_size", "--batch-size", type=int, default=50)
    p.add_argument("--seq_length", "--seq-length", type=int, default=50)
    p.add_argument("--vocab", type=int, default=65, help="vocabulary size (tiny-shakespeare: 65)")
    p.add_argument("--strategy", default="batch", choices=("batch", "gemm"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: phi_rnn's --precision bf16, PyTorch under autocast bfloat16, and the bfloat16 GEMM floor")
    p.add_argument("--blas", metavar="libxsmm|onednn|openblas|mkl", default=None,
                   help="float32 GEMM backend for the one-thread products, or STEP+SEQUENCE libraries "
                        "(default: the fastest here)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", action="store_true",
                   help="also time each kernel call of phi_rnn's iteration (mean ms per iteration)")
    p.add_argument("--parts", action="store_true",
                   help="also measure the scaling model's parts at this thread count (bench/scale/parts.py)")
    p.add_argument("--worker", choices=("phi_rnn", "torch"), help=argparse.SUPPRESS)
    affinity.add_thread_arguments(p)
    args = p.parse_args(argv)
    for name in ("rnn_size", "num_layers", "batch_size", "seq_length", "vocab", "iters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    return args


def summary(seconds, args, gflop, peak, rss_mb, cpu_seconds):
    import numpy as np
    ms = np.asarray(seconds) * 1e3
    median = float(np.median(ms))
    gflops = gflop / (median / 1e3)
    return {"ms": [round(float(v), 4) for v in ms], "median_ms": median, "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "cpu_median_ms": float(np.median(cpu_seconds)) * 1e3,
            "chars_per_s": args.batch_size * args.seq_length / (median / 1e3),
            "gflops": gflops, "pct_peak": 100 * gflops / peak if peak else None,
            "peak_rss_mb": rss_mb}


def sgemm_peak_gflops(n=2048, reps=5):
    """Best of `reps` MKL sgemm n x n x n at the configured thread count: the GEMM
    floor is the iteration's GEMM work at this rate."""
    import numpy as np
    from phi_rnn import blas
    from phi_rnn import kernels as K
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    c = np.zeros_like(a)
    with blas.using("mkl"):  # at one thread the small-GEMM backend would take this product
        K.gemm(False, False, 1.0, a, a, 0.0, c)
        best = min(_timed(lambda: K.gemm(False, False, 1.0, a, a, 0.0, c)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def bf16_peak_gflops(n=2048, reps=5):
    """Best of `reps` bfloat16 GEMMs n x n x n (float32 output) on the chosen bfloat16 library at
    the configured thread count: the bfloat16 GEMM floor is the iteration's GEMM work at this rate."""
    import numpy as np
    from phi_rnn import bf16
    a = bf16.to_bf16(np.random.default_rng(0).random((n, n), dtype=np.float32))
    c = np.zeros((n, n), np.float32)
    bf16.gemm_arrays(False, False, 1.0, a, a, 0.0, c)
    best = min(_timed(lambda: bf16.gemm_arrays(False, False, 1.0, a, a, 0.0, c)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def bf16_backend():
    """One line for reports: the bfloat16 GEMM library and the CPU features it runs on."""
    from phi_rnn import bf16
    return f"bf16 gemm {bf16.describe_backend()} on {' and '.join(bf16.native_features())}"


def small_gemm_peak_gflops(rows=25, n=512, k=128, calls=200, reps=15):
    """Every thread multiplying its own in-cache (rows x k) @ (k x n), as the recurrence does,
    through the chosen backend: the best rate the iteration's per-thread products can reach.
    Returns the total GFLOP/s of all threads."""
    import numba
    import numpy as np
    from phi_rnn import kernels as K
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    a = rng.random((threads, rows, k), dtype=np.float32)
    b = rng.random((threads, k, n), dtype=np.float32)
    c = np.zeros((threads, rows, n), np.float32)
    gemm, one_thread = K.gemm, K.set_num_threads_local

    @numba.njit(parallel=True)
    def repeated_products(a, b, c, calls):
        for p in numba.prange(a.shape[0]):
            one_thread(1)
            for _ in range(calls):
                gemm(False, False, 1.0, a[p], b[p], 1.0, c[p])
            one_thread(0)

    repeated_products(a, b, c, 1)
    best = min(_timed(lambda: repeated_products(a, b, c, calls)) for _ in range(reps))
    return 2 * threads * rows * n * k * calls / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_iterations(iteration, n):
    """Wall and process CPU seconds of iterations 0..n-1. At one thread the CPU time leaves
    out what a busy machine's other processes take; at more it counts spinning threads."""
    wall, cpu = [], []
    for k in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        iteration(k)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def phi_rnn_worker(args):
    from phi_rnn import blas
    from phi_rnn.cli import select_blas
    select_blas(args.blas)  # --blas, or the default (measured on the first run on a machine)
    if args.precision == "bf16":
        from phi_rnn.cli import select_bf16
        select_bf16()  # refused without native bfloat16; the fastest bfloat16 GEMM here
    from phi_rnn.model import gemm_flops
    net, iteration = training_iteration(args)
    for k in range(args.warmup):
        iteration(k)
    spent = _time_kernel_calls(net) if args.profile else {}
    times, cpu_times = _timed_iterations(iteration, args.iters)
    profile = {label: seconds / args.iters * 1e3 for label, seconds in spent.items()}
    gflop = gemm_flops(args.model, args.vocab, args.rnn_size, args.num_layers, args.batch_size, args.seq_length) / 1e9
    return times, cpu_times, gflop, profile, measured_parts(args) if args.parts else None


def measured_parts(args):
    """The scaling model's parts at this thread count on this config's shapes
    (bench/scale/parts.py): the gemm strategy's GEMMs threaded by MKL; the batch strategy's
    blocks slowing each other down (none at one thread)."""
    from bench.scale import parts
    shape = (args.model, args.vocab, args.rnn_size, args.num_layers, args.batch_size, args.seq_length)
    if args.strategy == "gemm":
        return {"gemm": parts.gemm_speedup(*shape)}
    return {"contention": parts.block_contention(*shape)} if args.threads > 1 else {}


def training_iteration(config):
    """(network, iteration(k)): a network of `config`'s shape (model, vocab, rnn_size,
    num_layers, batch_size, seq_length, strategy) with its kernels loaded, and one training
    iteration as in training (forward, backward, RMSprop) on the k-th of four fixed batches."""
    import numpy as np
    from phi_rnn.model import Network
    from phi_rnn.train import compile_kernels
    precision = getattr(config, "precision", "fp32")
    compile_kernels(config.model, config.strategy, lambda *a, **k: None, precision)
    rng = np.random.default_rng(0)
    net = Network(config.model, config.vocab, config.rnn_size, config.num_layers, strategy=config.strategy,
                  precision=precision)
    net.init_params(rng)
    T, B = config.seq_length, config.batch_size
    batches = [(rng.integers(0, config.vocab, (T, B)).astype(np.int32),
                rng.integers(0, config.vocab, (T, B)).astype(np.int32)) for _ in range(4)]
    state = net.zero_state(B)

    def iteration(k):
        x, y = batches[k % 4]
        net.forward(x, y, state)
        net.backward(x, False)
        net.update(2e-3, 0.95, 5.0)

    return net, iteration


PROFILED_KERNELS = ("reduce_parts", "reduce_parts_transposed", "multiply", "rmsprop_step")


def _time_kernel_calls(net):
    """Wraps the kernels that the model and the optimizer call from Python with timers: the
    network's training passes (a layer's and the decoder's forward and backward, serial or
    per block as its strategy chose) and the reductions, dropout and optimizer kernels.
    Returns the dict the timers add seconds to."""
    from collections import defaultdict
    from phi_rnn import kernels as K
    spent = defaultdict(float)

    def timed(name, kernel):
        def call(*args):
            t0 = time.perf_counter()
            result = kernel(*args)
            spent[name] += time.perf_counter() - t0
            return result
        return call

    net.passes = K.Passes(*(timed(name, kernel) for name, kernel in net.passes._asdict().items()))
    for name in PROFILED_KERNELS:
        setattr(K, name, timed(name, getattr(K, name)))
    return spent


def torch_worker(args):
    """The same training iteration in PyTorch: one-hot input, nn.LSTM / nn.GRU / nn.RNN
    (PyTorch's GRU applies the reset gate after its h2h product, char-rnn's before: the same
    GEMM work), Linear, cross-entropy summed over time, elementwise clamp,
    RMSprop(alpha=0.95, eps=1e-8)."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, H, L, T, B = args.vocab, args.rnn_size, args.num_layers, args.seq_length, args.batch_size
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[args.model](V, H, L)
    decoder = torch.nn.Linear(H, V)
    params = list(rnn.parameters()) + list(decoder.parameters())
    opt = torch.optim.RMSprop(params, lr=2e-3, alpha=0.95, eps=1e-8)
    batches = [(torch.randint(0, V, (T, B)), torch.randint(0, V, (T, B))) for _ in range(4)]
    state = (torch.zeros(L, B, H), torch.zeros(L, B, H)) if args.model == "lstm" else torch.zeros(L, B, H)
    detach = lambda s: tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def iteration(k):
        nonlocal state
        x, y = batches[k % 4]
        opt.zero_grad(set_to_none=False)
        with autocast:
            out, state = rnn(torch.nn.functional.one_hot(x, V).float(), state)
            state = detach(state)
            loss = torch.nn.functional.cross_entropy(decoder(out).view(T * B, V).float(), y.view(-1)) * T
        loss.backward()
        for p in params:
            p.grad.clamp_(-5, 5)
        opt.step()

    for k in range(args.warmup):
        iteration(k)
    return _timed_iterations(iteration, args.iters)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.worker == "torch":
            times, cpu_times = torch_worker(args)
            print(json.dumps({"times": times, "cpu_times": cpu_times, "rss_mb": peak_rss_mb()}))
            return 0
        plan = affinity.configure(args.threads, args.policy, args.threads_per_core, args.oversubscribe)
    except UsageError as e:
        print(f"speed.py: error: {e}", file=sys.stderr)
        return 2
    args.threads = plan.threads
    try:
        if args.worker == "phi_rnn":
            times, cpu_times, gflop, profile, parts = phi_rnn_worker(args)
            from phi_rnn import blas
            print(json.dumps({"times": times, "cpu_times": cpu_times, "gflop": gflop, "peak": sgemm_peak_gflops(),
                              "small_peak": small_gemm_peak_gflops(), "gemm": blas.describe_backend(),
                              "bf16_peak": bf16_peak_gflops() if args.precision == "bf16" else None,
                              "bf16_gemm": bf16_backend() if args.precision == "bf16" else None,
                              "vector": blas.vector_width(), "versions": versions(), "rss_mb": peak_rss_mb(),
                              "profile": profile, "parts": parts}))
            return 0
        worker_argv = [a for a in argv if a not in ("--json",)]
        mine = run_worker("phi_rnn", worker_argv, plan.threads, __file__)
    except UsageError as e:
        print(f"speed.py: error: {e}", file=sys.stderr)
        return 2
    report = {
        "machine": machine_record(plan.topology),
        "versions": mine["versions"],
        "config": {"model": args.model, "rnn_size": args.rnn_size, "num_layers": args.num_layers,
                   "batch_size": args.batch_size, "seq_length": args.seq_length, "vocab": args.vocab},
        "threads": plan.threads, "policy": plan.policy, "strategy": args.strategy, "precision": args.precision,
        "bf16_peak_gflops": mine["bf16_peak"],
        "placement": plan.describe(), "gemm": mine["gemm"], "vector": mine["vector"], "gflop_per_iter": mine["gflop"],
        "peak_gflops": mine["peak"], "small_gemm_peak_gflops": mine["small_peak"],
        "phi_rnn": summary(mine["times"], args, mine["gflop"], mine["peak"], mine["rss_mb"], mine["cpu_times"]),
        "torch": None, "ratio": None, "cpu_ratio": None, "profile": mine["profile"] or None,
        "parts": mine["parts"],
    }
    torch_side = TorchSide(
        worker_argv, plan.threads, __file__,
        summarize=lambda theirs: summary(theirs["times"], args, mine["gflop"], mine["peak"], theirs["rss_mb"],
                                         theirs["cpu_times"]),
        ratios=lambda ours, theirs: {"ratio": ours["median_ms"] / theirs["median_ms"],
                                     "cpu_ratio": ours["cpu_median_ms"] / theirs["cpu_median_ms"]})
    return finish(report, args.json, print_report, torch_side if args.torch else None)


def best_rate(r):
    """The higher of the two GEMM rates measured in the run (GFLOP/s, all threads)."""
    return max(r["peak_gflops"], r["small_gemm_peak_gflops"])


def print_report(r):
    c = r["config"]
    print_machine(r)
    print(f"config: {c['model']} {c['num_layers']} x {c['rnn_size']}, batch {c['batch_size']}, seq "
          f"{c['seq_length']}, vocab {c['vocab']}; strategy {r['strategy']}; {r.get('precision', 'fp32')}; "
          f"{r['gflop_per_iter']:.3f} GFLOP/iteration; sgemm peak {r['peak_gflops']:.1f} GFLOP/s "
          f"-> GEMM floor {r['gflop_per_iter'] / r['peak_gflops'] * 1e3:.1f} ms; per-thread 25 x 512 x 128 "
          f"products {r['small_gemm_peak_gflops']:.1f} GFLOP/s -> "
          f"{r['gflop_per_iter'] / best_rate(r) * 1e3:.1f} ms at the better rate")
    print_sides(r, lambda s: f"median {s['median_ms']:8.2f} ms  (min {s['min_ms']:.2f}, max {s['max_ms']:.2f}, "
                             f"n={len(s['ms'])})  {s['chars_per_s']:9.0f} chars/s  {s['gflops']:6.1f} GFLOP/s  "
                             f"{s['pct_peak']:5.1f}% of peak  RSS {s['peak_rss_mb']:.0f} MB  "
                             f"CPU median {s['cpu_median_ms']:.2f} ms")
    if r.get("bf16_peak_gflops"):
        print(f"bfloat16 GEMM peak {r['bf16_peak_gflops']:.1f} GFLOP/s -> bfloat16 GEMM floor "
              f"{r['gflop_per_iter'] / r['bf16_peak_gflops'] * 1e3:.1f} ms (float32's "
              f"{r['gflop_per_iter'] / r['peak_gflops'] * 1e3:.1f} ms)")
    if r["profile"]:
        mean = sum(r["phi_rnn"]["ms"]) / len(r["phi_rnn"]["ms"])
        print(f"profile (mean ms per iteration; iteration mean {mean:.2f} ms):")
        for label, ms in sorted(r["profile"].items(), key=lambda item: -item[1]):
            print(f"  {ms:7.3f}  {label}")
        print(f"  {mean - sum(r['profile'].values()):7.3f}  the rest (Python, numpy, dropout masks)")
    parts = r.get("parts") or {}
    if "contention" in parts:
        c = parts["contention"]
        print(f"parts: {c['blocks']} blocks of {c['block_rows']} rows, their GEMMs {c['alone_ms']:.2f} ms alone, "
              f"{c['together_ms']:.2f} ms all at once: contention k = {c['contention']:.2f}")
    if "gemm" in parts:
        g = parts["gemm"]
        print(f"parts: the iteration's GEMMs {g['threaded_ms']:.2f} ms as this process runs them "
              f"({g['one_thread_ms']:.2f} ms on one of its threads)")
    floor = r["gflop_per_iter"] / r["peak_gflops"] * 1e3
    strict = r["gflop_per_iter"] / best_rate(r) * 1e3
    line = (f"phi_rnn / GEMM floor = {r['phi_rnn']['median_ms'] / floor:.2f} "
            f"({r['phi_rnn']['median_ms'] / strict:.2f} at the better rate)")
    if r.get("bf16_peak_gflops"):
        line += f"; phi_rnn / bfloat16 GEMM floor = {r['phi_rnn']['median_ms'] * r['bf16_peak_gflops'] / r['gflop_per_iter'] / 1e3:.2f}"
    if r["ratio"] is not None:
        line += f"; phi_rnn / torch = {r['ratio']:.2f} ({r['cpu_ratio']:.2f} in CPU time)"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
