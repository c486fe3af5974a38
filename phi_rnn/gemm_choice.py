"""The GEMM backend phi_rnn runs when none is asked for: the fastest library on this machine,
measured on first use (use_default, from training, sampling and the benchmarks; importing
blas measures nothing) and kept per machine in the user cache (caches.py), so that every
run on a machine uses the same library (the same rounding: --resume stays bit-exact).
MKL's generic code path on AMD CPUs loses to the other libraries there; on Intel CPUs MKL
is fast. Until a backend is set, blas runs every product on MKL. The bfloat16 GEMM
libraries (bf16.py: oneDNN's, MKL's) are chosen the same way, on the same products with
bfloat16 operands, kept under a key of their own (use_default("bf16"), from bfloat16
training and its benchmarks).

What is measured: MEASURED_PRODUCTS, the per-thread products of a char-rnn iteration, on
operands as an iteration sees them (measurement_operands): per product of `calls` calls,
one contiguous float32 array A of shape (calls, m, k) ((calls, k, m) for a transposed A),
one C of shape (calls, m, n) and one B of shape (k, n), all row-major and standard normal;
call i computes C[i] = op(A[i]) B + beta C[i]. So each call has an A and a C of its own,
the slice after the previous call's, as a recurrence's step t reads hs[t - 1] and writes
gates[t] of the kernels' (T, nb, ...) arrays: a call finds them where the steps before
left them (L2/L3), not hot in L1 from the call before. Every call of a product shares its B,
as every step multiplies by the same weights; each product has a B of its own. The same
arrays serve every round (with beta 1 C accumulates). Where the kernels differ: the
backward recurrent product writes one (nb, H) buffer, dh, every step (here each call writes
its own C), and the kernels' cell arithmetic between two steps' products is not run here.
"""
import contextlib
import json
import sys
import time

import numpy as np

from phi_rnn import bf16, blas, caches, files
from phi_rnn.blas import KINDS, STEP_ROWS, one_thread, product_table, run_product_table

# The per-thread products of a char-rnn iteration (2 x 128 LSTM, 65 symbols, 25 of its 50
# batch rows per thread, 50 steps), each with the number of calls that gives it its share of
# the iteration's work and the beta the kernels call it with: (calls, trans_a, m, n, k, beta).
# Each layer's recurrent products forward (onto the gates, which hold the input projection)
# and backward, input projection, input gradient and weight gradient (x^T dG), the decoder.
MEASURED_PRODUCTS = ((50, False, 25, 512, 128, 1.0), (50, False, 25, 128, 512, 0.0),
                     (1, False, 1250, 512, 128, 0.0), (1, False, 1250, 128, 512, 0.0),
                     (1, True, 128, 512, 1250, 0.0), (1, False, 1250, 65, 128, 1.0),
                     (1, True, 65, 128, 1250, 0.0))


def measurement_operands(products, rng, precision="fp32"):
    """[(A, B, C), ...]: the operands of `products` as an iteration sees them (module
    docstring), drawn from `rng`; A and B float32, or with precision "bf16" bfloat16 (uint16),
    C float32. Reusing one A and C call after call would favour the libraries whose per-call
    kernels gain most from hot operands (libxsmm's AVX2 ones): their lead there was not the
    iteration's (bench/README.md)."""
    from numba.typed import List
    operand = (lambda x: bf16.to_bf16(x.astype(np.float32))) if precision == "bf16" else \
        (lambda x: x.astype(np.float32))
    operands = List()
    for calls, trans_a, m, n, k, _ in products:
        a = operand(rng.standard_normal((calls, k, m) if trans_a else (calls, m, k)))
        operands.append((a, operand(rng.standard_normal((k, n))),
                         rng.standard_normal((calls, m, n)).astype(np.float32)))
    return operands


def run_products(products, operands):
    """Every call of `products` on `operands` (measurement_operands) through the kernels' GEMM."""
    table, betas = product_table(products)
    run_product_table(operands, table, betas, 0, len(products))


def measure_rates(names, rounds=7, precision="fp32"):
    """Single-thread GFLOP/s {library: {"step": ..., "sequence": ...}} of each library in
    `names` (float32 ones, or bfloat16 ones with precision "bf16") on MEASURED_PRODUCTS'
    per-step and whole-sequence products."""
    step = [not t and m < STEP_ROWS for _, t, m, _, _, _ in MEASURED_PRODUCTS]
    split = step.index(False)
    assert not any(step[split:])  # the per-step products first
    rates = product_rates(names, MEASURED_PRODUCTS, {"step": (0, split), "sequence": (split, len(step))}, rounds,
                          precision)
    return {name: {kind: rates[name, kind] for kind in KINDS} for name in names}


def product_rates(names, products, groups, rounds=7, precision="fp32"):
    """{(library, group): GFLOP/s} for each library in `names` (or backend; bfloat16 ones with
    precision "bf16") and each group {name: (first, stop)} of `products` ((calls, trans_a, m,
    n, k, beta), ...) on operands as an iteration sees them (measurement_operands), on one
    thread: the libraries interleaved round by round, the median round each, timed in this
    thread's CPU time (time other processes take the core from it does not count)."""
    operands = measurement_operands(products, np.random.default_rng(0), precision)
    table, betas = product_table(products)
    flop = {group: sum(2 * c * m * n * k for c, _, m, n, k, _ in products[lo:hi]) for group, (lo, hi) in groups.items()}
    seconds = {(name, group): [] for name in names for group in groups}
    library = _libraries(precision)
    with one_thread():
        for r in range(rounds + 1):
            for name in names:
                with library.using(name):
                    for group, (lo, hi) in groups.items():
                        t0 = time.thread_time()
                        run_product_table(operands, table, betas, lo, hi)
                        if r:  # round 0 warms up (libxsmm generates its kernels there)
                            seconds[name, group].append(time.thread_time() - t0)
    return {key: flop[key[1]] / float(np.median(s)) / 1e9 for key, s in seconds.items()}


def _libraries(precision):
    """The module that runs the GEMMs of `precision`: blas (float32) or bf16, each with
    available(), using() and set_backend()."""
    return bf16 if precision == "bf16" else blas


# MKL is kept unless another library is faster by this much: a tie is noise.
MARGIN = 1.05


def choose(rates):
    """The backend to run given measured rates {library: {"step": GFLOP/s, "sequence": ...}}:
    per kind of product the fastest library, MKL unless another beats it by MARGIN; one name
    when both kinds go to the same library, else "step-library+sequence-library"."""
    chosen = []
    for kind in KINDS:
        of_kind = {name: r[kind] for name, r in rates.items()}
        best = max(of_kind, key=of_kind.get)
        if "mkl" in of_kind and of_kind[best] < MARGIN * of_kind["mkl"]:
            best = "mkl"
        chosen.append(best)
    return chosen[0] if chosen[0] == chosen[1] else "+".join(chosen)


# The measurement's version, first in the cache key: a measurement made another way (v1: one
# hot operand set per product, beta 0) is measured again, not trusted.
MEASUREMENT = "rates v2"


def _machine_key(precision):
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    names = _libraries(precision).available()
    libraries = ", ".join(f"{name} {blas.library_version(name)}" for name in names)
    # the float32 key as before this one had bfloat16's: what is kept stays valid
    measurement = f"{MEASUREMENT} bf16" if precision == "bf16" else MEASUREMENT
    return f"{measurement}; {model}; {blas.vector_width()}; {libraries}"


def cache_path():
    """The file the measured rates are kept in, or None where there is no user cache."""
    base = caches.user_cache_dir()
    return None if base is None else base / "gemm_backend.json"


_defaults = {}


def default_backend(precision="fp32"):
    """The backend phi_rnn runs when none is asked for (float32's, or bfloat16's)."""
    return default_choice(precision)[0]


def use_default(precision="fp32"):
    """Run the float32 GEMMs (with "bf16": the bfloat16 ones) on the default backend from
    now on (measured here on the first call on this machine)."""
    _libraries(precision).set_backend(*default_choice(precision))


def default_choice(precision="fp32"):
    """(backend, reason): the one library present, or the fastest here by measure_rates,
    measured once per machine (CPU, vector width, libraries), precision and process, and
    kept in cache_path()."""
    if precision not in _defaults:
        _defaults[precision] = _measured_choice(precision)
    return _defaults[precision]


def _measured_choice(precision):
    names = _libraries(precision).available()
    if len(names) == 1:
        return names[0], "the only library present"
    key = _machine_key(precision)
    path = cache_path()
    if path is None:
        entry = _measured_entry(names, precision)
        caches.say_not_kept("the GEMM backend is measured for this run only")
    else:
        with _cache_lock(path):  # processes starting together (MPI ranks) measure once, not each
            entry = _kept_rates(path, key, names)
            if entry is None:
                entry = _measured_entry(names, precision)
                _remember(path, key, entry)
    rates = entry["rates"]
    listed = ", ".join(f"{name} {r['step']:.1f}/{r['sequence']:.1f}" for name, r in rates.items())
    return choose(rates), (f"fastest here (1-thread GFLOP/s on a char-rnn iteration's per-step/whole-sequence "
                           f"products: {listed}; measured {entry['measured']})")


def _measured_entry(names, precision):
    return {"rates": measure_rates(names, precision=precision), "measured": time.strftime("%Y-%m-%d %H:%M")}


def _kept_rates(path, key, names):
    try:
        with files.open_regular(path, "GEMM backend cache", "r") as f:
            entry = json.loads(f.read()).get(key)
    except files.NotRegularFile as e:  # a FIFO would block, /dev/zero never end
        print(f"phi_rnn: warning: {e}: the GEMM backend is measured for this run only", file=sys.stderr, flush=True)
        return None
    except (OSError, ValueError, AttributeError):
        return None
    if (isinstance(entry, dict) and isinstance(entry.get("rates"), dict) and set(entry["rates"]) == set(names)
            and all(isinstance(r, dict) and set(r) == set(KINDS) for r in entry["rates"].values())):
        return entry
    return None


@contextlib.contextmanager
def _cache_lock(path):
    """An exclusive lock on path + ".lock" for the block; none where it cannot be made."""
    import fcntl
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = files.open_regular(str(path) + ".lock", "GEMM backend cache lock", "a")
    except (OSError, files.NotRegularFile):
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remember(path, key, entry):
    """Add `entry` to the cache file; a cache that cannot be written is only not kept."""
    try:
        with files.open_regular(path, "GEMM backend cache", "r") as f:
            known = json.loads(f.read())
        if not isinstance(known, dict):
            known = {}
    except files.NotRegularFile:
        return  # not phi_rnn's to replace (_kept_rates said so)
    except (OSError, ValueError):
        known = {}
    known[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(str(path), lambda f: f.write(json.dumps(known, indent=1).encode()))
    except OSError:  # a full disk or quota since the cache was found usable
        caches.say_not_kept("the GEMM backend is measured for this run only")
