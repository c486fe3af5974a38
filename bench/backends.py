"""The float32 GEMM backends side by side: bench/speed.py's phi_rnn worker on each backend and
PyTorch's, interleaved round after round in fresh processes (a busy machine then slows them
alike), with the medians over the rounds and the ratios of each round.

    python bench/backends.py --threads 1 --rounds 5
    python bench/backends.py --threads 2 --backends openblas,mkl --no-torch
    python bench/backends.py --precisions fp32,bf16    # also bfloat16: phi_rnn and PyTorch autocast
    python bench/backends.py --shapes --threads 1      # each GEMM of the iteration, per library
    python bench/backends.py --cpu-time                # 1 thread, one process, iterations in CPU time
    PHI_RNN_SMALL_GEMM=/nonexistent python bench/backends.py   # as without libxsmm

Every config flag of bench/speed.py passes through (--rnn_size, --batch_size, --iters, ...).

--precisions fp32,bf16 adds to every round phi_rnn in bf16 (speed.py --precision bf16: one row,
its bfloat16 GEMM library chosen inside phi_rnn, its float32 one speed.py's default) and
PyTorch under torch.autocast("cpu", dtype=torch.bfloat16); the bf16 row's ratios are to the
fastest float32 row of the run (phi_rnn bf16 / phi_rnn fp32) and to PyTorch's autocast bf16,
round by round. Every figure names its precision. On a CPU without native bfloat16
(avx512_bf16 or amx_bf16), bf16 alone is refused (phi_rnn.bf16's line, exit 2), and bf16 next
to fp32 is left out with that line as a note: the float32 rows are still worth the run.
--shapes and --cpu-time measure float32 only (bf16 there: one line, exit 2).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import speed  # noqa: E402
from bench.side_by_side import bf16_support, run_torch_reference, run_worker  # noqa: E402
from phi_rnn.errors import UsageError  # noqa: E402
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)

BACKENDS = ("libxsmm", "libxsmm+onednn", "onednn", "openblas", "mkl")
LIBRARIES = {"libxsmm", "onednn", "openblas", "mkl"}
PRECISIONS = ("fp32", "bf16")


def parse_args(argv):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated, of libxsmm, onednn, openblas, mkl, or STEP+SEQUENCE pairs such as "
                        "libxsmm+onednn (those not present here are left out)")
    p.add_argument("--no-torch", dest="torch", action="store_false")
    p.add_argument("--precisions", "--precision", default="fp32",
                   help="comma-separated, of fp32 (each --backends backend) and bf16 (phi_rnn --precision bf16, "
                        "PyTorch under autocast bfloat16); default fp32. --shapes and --cpu-time: fp32 only")
    p.add_argument("--cpu-time", action="store_true",
                   help="instead (fp32 only): one process, one thread, the backends' iterations interleaved and "
                        "timed in "
                        "the thread's CPU time (what a busy machine's other processes take does not count), "
                        "with the MKL 2048^3 sgemm floor timed the same way")
    p.add_argument("--shapes", action="store_true",
                   help="instead (fp32 only): 1-thread GFLOP/s (CPU time) of each library on each GEMM shape of the "
                        "iteration with --threads threads' blocks")
    args, speed_argv = p.parse_known_args(argv)
    speed.parse_args(speed_argv)  # the rest are speed.py's: a flag it does not know is one line, exit 2
    args.backends = args.backends.split(",")
    unknown = [b for b in args.backends if not set(b.split("+")) <= LIBRARIES]
    if unknown or args.rounds < 1 or args.threads < 1:
        raise UsageError(f"--backends {','.join(unknown)} unknown" if unknown else "--rounds and --threads must be positive")
    args.precisions = list(dict.fromkeys(x.strip() for x in args.precisions.split(",") if x.strip()))
    bad = [x for x in args.precisions if x not in PRECISIONS] or ([] if args.precisions else [""])
    if bad:
        raise UsageError(f"--precisions {bad[0]!r} unknown (choose from {', '.join(PRECISIONS)})")
    if "bf16" in args.precisions and (args.shapes or args.cpu_time):
        raise UsageError("--shapes and --cpu-time measure float32 only: leave bf16 out of --precisions")
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
    support = bf16_support()
    if "bf16" in args.precisions and support["refusal"]:
        if args.precisions == ["bf16"]:
            print(f"backends.py: error: {support['refusal']}", file=sys.stderr)
            return 2
        print(f"backends.py: bf16 left out: {support['refusal']}", file=sys.stderr)
        args.precisions.remove("bf16")
    return measure(args, speed_argv, support)


def measure(args, speed_argv, support):
    """The rounds: each round every row once, in a fresh process each; then the report."""
    bf16_argv = speed_argv + ["--precision", "bf16"]
    # (row name, precision) -> the worker's arguments: phi_rnn per float32 backend, one bf16 row
    rows = {(b, "fp32"): speed_argv + ["--blas", b] for b in args.backends if "fp32" in args.precisions}
    if "bf16" in args.precisions:
        rows["phi_rnn", "bf16"] = bf16_argv
    torch_rows = {p: argv for p, argv in (("fp32", speed_argv), ("bf16", bf16_argv))
                  if p in args.precisions and args.torch}
    ms = {row: [] for row in rows}
    torch_ms = {p: [] for p in torch_rows}
    floors = {p: [] for p in args.precisions}
    header = {}
    for r in range(args.rounds):
        for row in list(ms):
            try:
                out = run_worker("phi_rnn", rows[row], args.threads, speed.__file__)
            except UsageError as e:  # the library is not present here
                print(f"{row[0]}: left out ({e})", file=sys.stderr)
                del ms[row]
                continue
            ms[row].append(statistics.median(out["times"]) * 1e3)
            floors["fp32"].append(out["gflop"] / out["peak"] * 1e3)
            if out.get("bf16_peak"):
                floors["bf16"].append(out["gflop"] / out["bf16_peak"] * 1e3)
            header.setdefault(row, out["gemm"] if row[1] == "fp32" else f"{out['bf16_gemm']}; {out['gemm']}")
            header["vector"] = out["vector"]
            header["versions"] = out["versions"]
        for precision, argv in torch_rows.items():
            theirs = run_torch_reference(argv, args.threads, speed.__file__)
            if theirs:
                torch_ms[precision].append(statistics.median(theirs["times"]) * 1e3)
                header.setdefault("versions", {})["torch"] = theirs["version"]
        print(f"round {r + 1}: " + ", ".join(f"{b} {p} {m[-1]:.2f}" for (b, p), m in ms.items())
              + "".join(f", torch {p} {m[-1]:.2f}" for p, m in torch_ms.items() if len(m) == r + 1) + " ms",
              file=sys.stderr, flush=True)
    if not ms:
        print("backends.py: error: no backend of --backends is present here", file=sys.stderr)
        return 2
    report(args, support, header, ms, {p: m for p, m in torch_ms.items() if m}, floors)
    return 0


def spread(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def ratio(mine, theirs):
    """'median (min-max)' of the per-round ratios mine / theirs; '' unless every round has both."""
    if len(mine) != len(theirs):
        return ""
    return spread([m / t for m, t in zip(mine, theirs)])


def report(args, support, header, ms, torch_ms, floors):
    """The header (versions; threads, vectors, the CPU's bfloat16 flags, the floors) and one line
    per row: its precision, median ms (min-max), / the GEMM floor of that precision, for the bf16
    row / the fastest fp32 row, / torch in the same precision; PyTorch's rows last."""
    print(", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    bf16_cpu = (f"{' '.join(support['flags'])} ({'native' if support['native'] else 'not usable here'})"
                if support["flags"] else "none (no avx512_bf16, no amx_bf16)")
    floor = {p: statistics.median(f) for p, f in floors.items() if f}
    print(f"threads {args.threads}; vectors {header['vector']}; bfloat16 CPU flags: {bf16_cpu}; {args.rounds} rounds, "
          f"each a median of the iterations; GEMM floor (2048^3 GEMM rate of each run) median "
          + ", ".join(f"{p} {floor[p]:.2f} ms" for p in PRECISIONS if p in floor)
          + ("" if "bf16" not in floor else " (fp32: MKL sgemm; bf16: phi_rnn's bfloat16 GEMM)"))
    fastest = min((row for row in ms if row[1] == "fp32"), key=lambda row: statistics.median(ms[row]), default=None)
    for (name, precision), times in ms.items():
        line = (f"{name:9s} {precision} {statistics.median(times):7.2f} ms ({min(times):.2f}-{max(times):.2f})  "
                f"/ floor {statistics.median(times) / floor[precision]:.2f}")
        if precision == "bf16" and fastest and ratio(times, ms[fastest]):
            line += f"  / {fastest[0]} fp32 {ratio(times, ms[fastest])}"
        if ratio(times, torch_ms.get(precision, [])):
            line += f"  / torch {precision} {ratio(times, torch_ms[precision])}"
        print(line + f"   [{header[name, precision]}]")
    for precision, times in torch_ms.items():
        line = f"{'torch':9s} {precision} {statistics.median(times):7.2f} ms ({min(times):.2f}-{max(times):.2f})"
        if precision == "bf16":
            line += (f"  / torch fp32 {ratio(times, torch_ms['fp32'])}" if ratio(times, torch_ms.get("fp32", []))
                     else "") + "   [torch.autocast bfloat16]"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
