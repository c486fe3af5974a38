"""The bfloat16 GEMMs against the float32 ones on char-rnn's products, one thread: oneDNN's
dnnl_sgemm and MKL's sgemm beside oneDNN's dnnl_gemm_bf16bf16f32 and MKL's
cblas_gemm_bf16bf16f32, each through the dispatcher the kernels call, and MKL's on weights
packed once; with the costs of rounding float32 to bfloat16 and of packing a weight matrix.

    python bench/bf16_gemm.py
    python bench/bf16_gemm.py --rounds 21
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/bf16_gemm.py   # oneDNN without AMX

Products (char-rnn: 2 x 128 LSTM, batch 50, 50 steps, 65 symbols): a per-step one runs 50
calls, each on its step's slice of A and C with one B, as a recurrence does; a
whole-sequence one runs once over 2500 rows (all 50 rows of all steps). The libraries
are interleaved round by round, each round times each product on each library once (the
same work repeated to at least --min-ms), in this thread's CPU time (time other processes
take from it does not count); printed are the medians over the rounds, the spread
(the middle half of the rounds, in % of the median), and bfloat16 / float32 time ratios.
"""
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_rnn import affinity  # noqa: E402  (light: starts no runtime)
from phi_rnn.cli import OneLineErrorParser  # noqa: E402
from phi_rnn.errors import UsageError  # noqa: E402

# (name, calls, trans_a, trans_b, m, n, k, beta); "one C": every call writes the same C (a
# chunk's output consumed before the next is made, in cache), not a slice of its own.
PRODUCTS = (
    ("step: h 25 x W_hh (block of 25)", 50, False, False, 25, 512, 128, 1.0),
    ("step: h 50 x W_hh (whole batch)", 50, False, False, 50, 512, 128, 1.0),
    ("step back: dG 25 x W_hh", 50, False, False, 25, 128, 512, 0.0),
    ("step back: dG 25 x W_hh_t^T", 50, False, True, 25, 128, 512, 0.0),
    ("sequence: x 2500 x W_ih", 1, False, False, 2500, 512, 128, 0.0),
    ("sequence in chunks: x 250 x W_ih, one C", 10, False, False, 250, 512, 128, 0.0),
    ("sequence back: dG 2500 x W_ih", 1, False, False, 2500, 128, 512, 0.0),
    ("decoder: h 2500 x W_dec", 1, False, False, 2500, 65, 128, 1.0),
    ("weight grad: x^T dG, k 2500", 1, True, False, 128, 512, 2500, 0.0),
    ("decoder weight grad: dy^T h, k 2500", 1, True, False, 65, 128, 2500, 0.0),
)
LIBRARIES = (("dnnl sgemm", "f32", "onednn"), ("mkl sgemm", "f32", "mkl"),
             ("dnnl bf16", "bf16", "onednn"), ("mkl bf16", "bf16", "mkl"), ("mkl bf16 packed", "packed", "mkl"))
# Rounding float32 to bfloat16 (rows x columns): the gates of all steps, a layer's weights.
CONVERSIONS = (("round gates 2500 x 512", 2500, 512), ("round W 128 x 512", 128, 512))
# MKL packing a layer's weights for its products (once per update).
PACKINGS = (("pack W_hh 128 x 512 for 25 rows", 25, 512, 128),)
FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def parse_args(argv):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--min-ms", type=float, default=20.0, help="least CPU time one timing repeats its work to")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.min_ms <= 0:
        raise UsageError("--rounds and --min-ms must be positive")
    return args


def operands(rng, name, calls, trans_a, trans_b, m, n, k):
    """(A slices, B, C slices) in float32 and A, B in bfloat16: a call i runs on A[i] and
    C[i], or C[0] where C has one slice."""
    a = rng.standard_normal((calls, k, m) if trans_a else (calls, m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal((1 if name.endswith("one C") else calls, m, n)).astype(np.float32)
    return a, b, c, bf16.to_bf16(a), bf16.to_bf16(b)


def make_runners():
    """Compiled loops running all calls of a product through the float32 or the bfloat16 GEMM
    (defined here: numba and the libraries load after affinity.configure)."""
    from numba import njit

    @njit(cache=True)
    def run_f32(a, b, c, trans_a, trans_b, beta, repeat):
        m, n = c.shape[1], c.shape[2]
        k = a.shape[1] if trans_a else a.shape[2]
        ta = blas.TRANS if trans_a else blas.NO_TRANS
        tb = blas.TRANS if trans_b else blas.NO_TRANS
        for _ in range(repeat):
            for i in range(a.shape[0]):
                blas.sgemm(blas.ROW_MAJOR, ta, tb, m, n, k, np.float32(1.0), a[i].ctypes.data, a.shape[2],
                           b.ctypes.data, b.shape[1], np.float32(beta), c[i % c.shape[0]].ctypes.data, n)

    @njit(cache=True)
    def run_bf16(a, b, c, trans_a, trans_b, beta, repeat):
        for _ in range(repeat):
            for i in range(a.shape[0]):
                bf16.gemm_arrays(trans_a, trans_b, 1.0, a[i], b, beta, c[i % c.shape[0]])

    @njit(cache=True)
    def run_packed(a, packed, c, trans_a, trans_b, beta, repeat):
        for _ in range(repeat):
            for i in range(a.shape[0]):
                bf16.gemm_packed_arrays(trans_a, 1.0, a[i], packed, beta, c[i % c.shape[0]])

    @njit(cache=True)
    def run_rounding(values, out, repeat):
        for _ in range(repeat):
            bf16.round_into(values, out)

    @njit(cache=True)
    def run_packing(b, m, packed, repeat):
        for _ in range(repeat):
            bf16.pack_into(False, b, m, packed)

    return {"f32": run_f32, "bf16": run_bf16, "packed": run_packed}, run_rounding, run_packing


def timed(run, args, repeat):
    t0 = time.thread_time()
    run(*args, repeat)
    return time.thread_time() - t0


def repeats_for(run, args, min_seconds):
    """How often `run` repeats its work so that one timing takes at least min_seconds."""
    once = max(timed(run, args, 1), 1e-6)
    return max(1, int(np.ceil(min_seconds / once)))


def measure(args):
    """{(product or conversion, library): [seconds per repetition, one per round]}."""
    runs, run_rounding, run_packing = make_runners()
    rng = np.random.default_rng(0)
    cases = []  # (key, backend, run, arguments)
    for name, calls, trans_a, trans_b, m, n, k, beta in PRODUCTS:
        a, b, c, a16, b16 = operands(rng, name, calls, trans_a, trans_b, m, n, k)
        packed = None if trans_a else bf16.packed_operand(m, n, k)  # only B = weights is packed
        if packed is not None:
            bf16.pack_into(trans_b, b16, m, packed)
        given = {"f32": (a, b), "bf16": (a16, b16), "packed": (a16, packed)}
        for library, precision, backend in LIBRARIES:
            if given[precision][1] is not None:
                arguments = (*given[precision], c, trans_a, trans_b, beta)
                cases.append(((name, library), backend, runs[precision], arguments))
    for name, rows, cols in CONVERSIONS:
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        cases.append(((name, "numba"), None, run_rounding, (values, np.empty((rows, cols), np.uint16))))
    for name, m, n, k in PACKINGS:
        b16 = bf16.to_bf16(rng.standard_normal((k, n)))
        cases.append(((name, "mkl"), None, run_packing, (b16, m, bf16.packed_operand(m, n, k))))
    seconds = {key: [] for key, *_ in cases}
    with blas.one_thread():
        repeats = {}
        for key, backend, run, arguments in cases:
            with blas.using(backend or "mkl"), bf16.using(backend or "mkl"):
                run(*arguments, 1)  # compiles, warms the library's kernels up
                repeats[key] = repeats_for(run, arguments, args.min_ms / 1e3)
        for _ in range(args.rounds):
            for key, backend, run, arguments in cases:
                with blas.using(backend or "mkl"), bf16.using(backend or "mkl"):
                    seconds[key].append(timed(run, arguments, repeats[key]) / repeats[key])
    return seconds


def summary(samples):
    """(median, spread): the middle half of the samples' width in % of their median."""
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return median, 100 * (q3 - q1) / median


def print_machine():
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    flags = bf16.cpu_flags()
    import numba
    print(f"machine: {platform.node()}; {model}; {len(os.sched_getaffinity(0))} CPUs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"CPU flags: {', '.join(f'{f}' if f in flags else f'no {f}' for f in FLAGS)}; oneDNN ISA "
          f"{blas._onednn.dnnl_get_effective_cpu_isa():#x}; native bfloat16 as oneDNN may use it: "
          f"{', '.join(bf16.native_features()) or 'none'}")
    caps = [f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(v)]
    capped = f"; capped: {', '.join(caps)}" if caps else ""
    print(f"versions: oneDNN {blas.library_version('onednn')}, MKL {blas.mkl_version()}, numpy {np.__version__}, "
          f"numba {numba.__version__}, Python {platform.python_version()}{capped}")


def report(seconds, rounds):
    print(f"\none thread, {rounds} rounds interleaved; per library: ms per product (all its calls), median, "
          "GFLOP/s from it, (spread: the middle half of the rounds, % of the median); then bf16 / f32 time, "
          "best of each")
    width = max(len(name) for name, *_ in PRODUCTS) + 2
    print(f"{'product':{width}}{'calls':>5} {'m x n x k':>15}" + "".join(f"{lib:>23}" for lib, *_ in LIBRARIES)
          + f"{'bf16/f32':>9}{'packed':>7}")
    for name, calls, trans_a, trans_b, m, n, k, _ in PRODUCTS:
        flop = 2.0 * calls * m * n * k
        medians = {}
        cells = ""
        for library, *_ in LIBRARIES:
            if (name, library) not in seconds:
                cells += f"{'-':>23}"
                continue
            median, spread = summary(seconds[name, library])
            medians[library] = median
            cells += f"{median * 1e3:9.3f} {flop / median / 1e9:5.0f} ({spread:3.0f}%)"
        ops = ("T" if trans_a else "N") + ("T" if trans_b else "N")
        best_f32 = min(medians["dnnl sgemm"], medians["mkl sgemm"])
        best_bf16 = min(medians["dnnl bf16"], medians["mkl bf16"])
        packed = f"{medians['mkl bf16 packed'] / best_f32:7.2f}" if "mkl bf16 packed" in medians else f"{'-':>7}"
        print(f"{name:{width}}{calls:>5} {f'{ops} {m}x{n}x{k}':>15}{cells}{best_bf16 / best_f32:9.2f}{packed}")
    for name, rows, cols in CONVERSIONS:
        median, spread = summary(seconds[name, "numba"])
        print(f"{name:{width}} {median * 1e3:.3f} ms ({spread:.0f}%), {rows * cols * 6 / median / 1e9:.1f} GB/s "
              "read + written")
    for name, *_ in PACKINGS:
        median, spread = summary(seconds[name, "mkl"])
        print(f"{name:{width}} {median * 1e3:.3f} ms ({spread:.0f}%)")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    affinity.configure(threads=1, policy="none")
    global np, blas, bf16
    import numpy as np
    from phi_rnn import bf16, blas
    print_machine()
    report(measure(args), args.rounds)


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"phi_rnn: error: {e}", file=sys.stderr)
        sys.exit(2)
