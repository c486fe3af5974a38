"""The cost of one parallel region (fork, a near-empty body, join) at p threads, as phi_rnn's
kernels pay it: numba's prange on the OpenMP runtime and placement of a training run.

    python -m bench.scale.barrier --threads 16 [--policy compact]   # prints one JSON object

The study runs it once per (threads, policy) in a fresh process (bench/scale/run.py); the
model of time per iteration (bench/scale/model.py) charges it for every parallel region of an
iteration.
"""
import json
import sys
import time

from phi_rnn import affinity  # starts no runtime
from phi_rnn.cli import OneLineErrorParser  # one-line errors, exit 2; starts no runtime
from phi_rnn.errors import UsageError

CALLS = 5000
PROG = "bench.scale.barrier"


def main(argv=None):
    parser = OneLineErrorParser(prog=PROG, description=__doc__.splitlines()[0])
    affinity.add_thread_arguments(parser)
    args = parser.parse_args(argv)
    try:
        plan = affinity.configure(args.threads, args.policy, args.threads_per_core, args.oversubscribe)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    import numba
    import numpy as np

    from phi_rnn import blas  # noqa: F401,E501  (MKL joins libgomp as in training)

    @numba.njit(parallel=True, cache=True)
    def region(x):
        for i in numba.prange(x.shape[0] // 16):
            x[16 * i] += 1.0  # one cache line per thread

    @numba.njit(cache=True)
    def serial(x):
        for i in range(x.shape[0] // 16):
            x[16 * i] += 1.0

    x = np.zeros(16 * plan.threads)

    def per_call_us(fn):
        """Median of single calls: robust to the preemptions of a busy machine, as the
        medians of the study's points are."""
        fn(x)
        times = np.empty(CALLS)
        for k in range(CALLS):
            t0 = time.perf_counter()
            fn(x)
            times[k] = time.perf_counter() - t0
        return float(np.median(times)) * 1e6

    parallel_us, serial_us = per_call_us(region), per_call_us(serial)
    # the call from Python costs the same in both: their difference is the region's own cost
    print(json.dumps({"threads": plan.threads, "policy": plan.policy,
                      "region_us": max(parallel_us - serial_us, 0.0), "call_us": parallel_us,
                      "serial_call_us": serial_us}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
