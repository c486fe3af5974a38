"""The float32 GEMM backends side by side: bench/speed.py's phi_rnn worker on each backend and
PyTorch's, interleaved round after round in fresh processes (a busy machine then slows them
alike), with the medians over the rounds and the ratios of each round.

    python bench/backends.py --threads 1 --rounds 5
    python bench/backends.py --threads 2 --backends openblas,mkl --no-torch
    python bench/backends.py --shapes --threads 1      # each GEMM of the iteration, per library
    python bench/backends.py --cpu-time                # 1 thread, one process, iterations in CPU time
    PHI_RNN_SMALL_GEMM=/nonexistent python bench/backends.py   # as without libxsmm

Every config flag of bench/speed.py passes through (--rnn_size, --batch_size, --iters, ...).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import speed  # noqa: E402
from bench.side_by_side import run_torch_reference, run_worker  # noqa: E402
from phi_rnn.errors import UsageError  # noqa: E402
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)

BACKENDS = ("libxsmm", "libxsmm+onednn", "onednn", "openblas", "mkl")
LIBRARIES = {"libxsmm", "onednn", "openblas", "mkl"}


def parse_args(argv):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, of libxsmm, onednn, openblas, mkl, or STEP+SEQUENCE pairs such as "
                        "libxsmm+onednn (those not present here are left out)")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--cpu-time", action="store_true",
                   help="instead: one process, one thread, the backends' iterations interleaved and timed in "
                        "the thread's CPU time (what a busy machine's other processes take does not count), "
                        "with the MKL 2048^3 sgemm floor timed the same way")
    p.add_argument("--shapes", action="store_true",
                   help="instead: 1-thread GFLOP/s (CPU time) of each library on each GEMM shape of the "
                        "iteration with --threads threads' blocks")
    args, speed_argv = p.parse_known_args(argv)
    speed.parse_args(speed_argv)  # the rest are speed.py's: a flag it does not know is one line, exit 2
    args.backends = args.backends.split(",")
    unknown = [b for b in args.backends if not set(b.split("+")) <= LIBRARIES]
    if unknown or args.rounds < 1 or args.threads < 1:
        raise UsageError(f"--backends {','.join(unknown)} unknown" if unknown else "--rounds and --threads must be positive")
    return args, speed_argv


def shape_rates(args, speed_argv):
    """Every GEMM shape of an iteration (speed.py's config, one block of batch / threads rows),
    each library side by side on one thread."""
    p = OneLineErrorParser()
    for name, default in (("--rnn_size", 128), ("--num_layers", 2), ("--batch_size", 50), ("--seq_length", 50),
                          ("--vocab", 65)):
        p.add_argument(name, type=int, default=default)
    config, _ = p.parse_known_args(speed_argv)
    from phi_rnn import affinity
    affinity.configure(1, "none", None, False)
    from phi_rnn import blas
    H, T, V, nb = config.rnn_size, config.seq_length, config.vocab, -(-config.batch_size // args.threads)
    G, rows = 4 * H, T * nb
    products = [("per-step forward h W_hh^T", (T, False, nb, G, H, 1.0)),
                ("per-step backward dG W_hh", (T, False, nb, H, G, 0.0)),
                ("input projection", (1, False, rows, G, H, 0.0)), ("input gradient", (1, False, rows, H, G, 0.0)),
                ("weight gradient x^T dG", (1, True, H, G, rows, 0.0)), ("decoder logits", (1, False, rows, V, H, 1.0)),
                ("decoder input gradient", (1, False, rows, H, V, 0.0)),
                ("decoder weight gradient", (1, True, V, H, rows, 0.0))]
    names = [b for b in args.backends if set(b.split("+")) <= set(blas.available())]
    groups = {label: (i, i + 1) for i, (label, _) in enumerate(products)}
    from phi_rnn import gemm_choice
    rates = gemm_choice.product_rates(names, [p for _, p in products], groups, rounds=args.rounds)
    print(f"{blas.vector_width()}; 1 thread, GFLOP/s in CPU time, median of {args.rounds} interleaved rounds; "
          + ", ".join(f"{n} {blas.library_version(n)}" for n in blas.available()))
    print(f"{'product':28s} {'M x N x K':>24s}  " + "  ".join(f"{n:>9s}" for n in names))
    for label, (_, trans_a, m, n, k, _) in products:
        shape = f"{m} x {n} x {k}" + (" (A^T)" if trans_a else "")
        print(f"{label:28s} {shape:>24s}  " + "  ".join(f"{rates[name, label]:9.1f}" for name in names))
    return 0


def cpu_times(args, speed_argv):
    """The training iteration of speed.py's config on each backend, in one process on one
    thread: 5 iterations per backend and round, rounds interleaved, CPU time."""
    import time
    import speed
    config = speed.parse_args(speed_argv + ["--threads", "1"])
    from phi_rnn import affinity
    affinity.configure(1, "none", None, False)
    import numpy as np
    from phi_rnn import blas
    from phi_rnn import kernels as K
    from phi_rnn.model import gemm_flops
    _, iteration = speed.training_iteration(config)
    T, B = config.seq_length, config.batch_size

    names = [b for b in args.backends if set(b.split("+")) <= set(blas.available())]
    ms = {name: [] for name in names}
    for r in range(args.rounds + 1):
        for name in names:
            with blas.using(name):
                iteration(0)
                t0 = time.thread_time()
                for k in range(5):
                    iteration(k)
                if r:
                    ms[name].append((time.thread_time() - t0) / 5 * 1e3)
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    c = np.zeros_like(a)
    with blas.using("mkl"):
        best = float("inf")
        for _ in range(6):
            t0 = time.thread_time()
            K.gemm(False, False, 1.0, a, a, 0.0, c)
            best = min(best, time.thread_time() - t0)
    floor = gemm_flops(config.model, config.vocab, config.rnn_size, config.num_layers, B, T) / (2 * 2048 ** 3 / best)
    print(f"{blas.vector_width()}; 1 thread, CPU ms per iteration, median of {args.rounds} interleaved rounds of 5; "
          f"GEMM floor (MKL 2048^3 sgemm, {2 * 2048 ** 3 / best / 1e9:.1f} GFLOP/s) {floor * 1e3:.2f} ms; "
          + ", ".join(f"{n} {blas.library_version(n)}" for n in blas.available()))
    for name in names:
        median = float(np.median(ms[name]))
        print(f"{name:17s} {median:7.2f} ms ({min(ms[name]):.2f}-{max(ms[name]):.2f})  / floor "
              f"{median / (floor * 1e3):.2f}")
    return 0


def main(argv=None):
    try:
        args, speed_argv = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"backends.py: error: {e}", file=sys.stderr)
        return 2
    if args.shapes:
        return shape_rates(args, speed_argv)
    if args.cpu_time:
        return cpu_times(args, speed_argv)
    medians = {b: [] for b in args.backends}
    floors, torch_ms, header = [], [], {}
    for r in range(args.rounds):
        for b in list(medians):
            try:
                out = run_worker("phi_rnn", speed_argv + ["--blas", b], args.threads, speed.__file__)
            except UsageError as e:  # the library is not present here
                print(f"{b}: left out ({e})", file=sys.stderr)
                del medians[b]
                continue
            medians[b].append(statistics.median(out["times"]) * 1e3)
            floors.append(out["gflop"] / out["peak"] * 1e3)
            header.setdefault(b, out["gemm"])
            header["vector"] = out["vector"]
            header["versions"] = out["versions"]
        if args.torch:
            theirs = run_torch_reference(speed_argv, args.threads, speed.__file__)
            if theirs:
                torch_ms.append(statistics.median(theirs["times"]) * 1e3)
                header["versions"]["torch"] = theirs["version"]
        print(f"round {r + 1}: " + ", ".join(f"{b} {m[-1]:.2f}" for b, m in medians.items())
              + (f", torch {torch_ms[-1]:.2f}" if torch_ms else "") + " ms", file=sys.stderr, flush=True)
    print(", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    print(f"threads {args.threads}; vectors {header['vector']}; {args.rounds} rounds, each a median of the "
          f"iterations; GEMM floor (MKL 2048^3 sgemm rate of each run) median {statistics.median(floors):.2f} ms")
    floor = statistics.median(floors)
    for b, ms in medians.items():
        line = (f"{b:9s} {statistics.median(ms):7.2f} ms ({min(ms):.2f}-{max(ms):.2f})  "
                f"/ floor {statistics.median(ms) / floor:.2f}")
        if len(torch_ms) == len(ms):
            ratios = [m / t for m, t in zip(ms, torch_ms)]
            line += f"  / torch {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(line + f"   [{header[b]}]")
    if torch_ms:
        print(f"{'torch':9s} {statistics.median(torch_ms):7.2f} ms ({min(torch_ms):.2f}-{max(torch_ms):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
