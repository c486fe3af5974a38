"""The parts of the model of time per iteration (model.py) that only exist at p threads,
measured inside a point's own process next to the point (`bench/speed.py --parts`), on the
point's own shapes, as synthetic runs of the iteration's GEMMs (not the iteration itself):

- contention: the GEMMs of one block (every product of an iteration on b = ceil(B / blocks)
  rows) run by all blocks' threads at once, over the same run by one thread while the others
  wait. The block series R(b) is measured on one core with the others idle; blocks that run
  together share the last-level cache and memory bandwidth (and, on a VM, whatever the host
  shares between its virtual CPUs).
- threaded GEMMs: the iteration's GEMMs on the whole batch threaded by MKL at p threads,
  G(p) (the gemm strategy's products), and the same on one thread on the small-GEMM backend,
  interleaved round by round. The model takes the one-thread time from the 1-thread point's
  own process: here p - 1 OpenMP threads spin next to it, which a 1-thread run does not have.

The contention is a ratio of runs interleaved round by round in one process, so the
machine's drift between points does not enter it.

Both run on *hot-state operands* (_operands): a per-step product's A is one (m, k) slice that
every call reuses, the state its step just computed, hot in cache; its C is the step's own
slice of the gates when it adds to them (beta 1, the forward) and one slice that every call
reuses when it overwrites it (beta 0, the backward); one B per product, the weights every
block shares. The GEMM library choice (phi_rnn.blas) measures on *stepped operands* instead,
each call on its own A and C; each way is the one its use was checked against
(bench/README.md, "Levers tried and rejected").
"""
import time

import numba
import numpy as np
from numba import njit, prange
from numba.typed import List

from phi_rnn import blas
from phi_rnn.blas import run_product_table, set_num_threads_local
from phi_rnn.cells import GATES

BUDGET_S = 1.5  # for each part, all rounds together: a point's own timing takes seconds
ROUNDS = (1, 7)  # at least, at most


def iteration_products(model, vocab, rnn_size, num_layers, rows, seq_length):
    """Every GEMM of a training iteration on `rows` batch rows as (calls, trans_a, m, n, k,
    beta), the form gemm_choice.product_rates takes: per layer the recurrent product forward (onto
    the gates) and backward per step and the recurrent weight gradient; per layer above the
    first (whose input is a gather) the input projection, its weight and input gradients; the
    decoder forward and its two gradients. Their work is model.gemm_flops."""
    g, h, steps = GATES[model] * rnn_size, rnn_size, rows * seq_length
    recurrent = [(seq_length, False, rows, g, h, 1.0), (seq_length, False, rows, h, g, 0.0),
                 (1, True, h, g, steps, 0.0)]
    upper = [(1, False, steps, g, h, 0.0), (1, True, h, g, steps, 0.0), (1, False, steps, h, g, 0.0)]
    decoder = [(1, False, steps, vocab, h, 1.0), (1, True, vocab, h, steps, 0.0),
               (1, False, steps, h, vocab, 0.0)]
    return tuple(recurrent * num_layers + upper * (num_layers - 1) + decoder)


def _operands(products, blocks, rng):
    """Each block's hot-state operands of `products` (module docstring), for
    blas.run_product_table: [[(A, B, C) per product] per block], one B per product shared by
    the blocks; A of shape (1, m, k) (or (1, k, m) transposed), C of shape (calls, m, n) when
    beta is 1, else (1, m, n). All written here, so that no timed run pays the page faults of
    their first touch."""
    weights = [rng.standard_normal((k, n), dtype=np.float32) for _, _, _, n, k, _ in products]
    by_block = List()
    for _ in range(blocks):
        operands = List()
        for (calls, trans_a, m, n, k, beta), b in zip(products, weights):
            operands.append((rng.standard_normal((1, k, m) if trans_a else (1, m, k), dtype=np.float32), b,
                             np.full((calls if beta else 1, m, n), 0.5, np.float32)))
        by_block.append(operands)
    return by_block


def _tables(products):
    """{warm_up: (table, betas)}: every call of the products, or one call of each."""
    table, betas = blas.product_table(products)
    warm = table.copy()
    warm[:, 0] = 1
    return {False: (table, betas), True: (warm, betas)}


@njit(parallel=True, cache=True)
def _run_blocks(operands, table, betas, blocks):
    """Blocks 0..blocks-1 at once, one per thread, each on one thread as in the batch
    strategy's block kernels (kernels.layer_forward_blocks)."""
    for block in prange(blocks):
        set_num_threads_local(1)
        run_product_table(operands[np.int64(block)], table, betas, 0, table.shape[0])  # prange counts in uint64
        set_num_threads_local(0)


def _interleaved_medians(runs):
    """{name: median seconds} of the callables in `runs`, run in turn round by round: after a
    warm-up (run(warm_up=True): one call of each product), as many
    rounds as BUDGET_S allows within ROUNDS (a round longer than BUDGET_S is the only one)."""
    for run in runs.values():
        run(warm_up=True)
    seconds = {name: [] for name in runs}

    def one_round():
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)

    one_round()
    rounds = int(np.clip(BUDGET_S / sum(s[0] for s in seconds.values()), *ROUNDS))
    for _ in range(rounds - 1):
        one_round()
    return {name: float(np.median(s)) for name, s in seconds.items()}, rounds


def block_contention(model, vocab, rnn_size, num_layers, batch_size, seq_length):
    """The batch strategy's blocks at this process's thread count: {"blocks", "block_rows",
    "alone_ms", "together_ms", "contention" (together / alone), "rounds"}."""
    blocks = max(1, min(numba.get_num_threads(), batch_size))
    rows = -(-batch_size // blocks)
    products = iteration_products(model, vocab, rnn_size, num_layers, rows, seq_length)
    operands = _operands(products, blocks, np.random.default_rng(0))
    tables = _tables(products)
    medians, rounds = _interleaved_medians({
        "alone": lambda warm_up=False: _run_blocks(operands, *tables[warm_up], 1),
        "together": lambda warm_up=False: _run_blocks(operands, *tables[warm_up], blocks)})
    return {"blocks": blocks, "block_rows": rows, "alone_ms": medians["alone"] * 1e3,
            "together_ms": medians["together"] * 1e3,
            "contention": medians["together"] / medians["alone"], "rounds": rounds}


def gemm_speedup(model, vocab, rnn_size, num_layers, batch_size, seq_length):
    """The gemm strategy's products at this process's thread count: {"one_thread_ms" (on the
    small-GEMM backend, as a one-thread run takes them), "threaded_ms" (MKL on every thread),
    "speedup", "rounds"}."""
    products = iteration_products(model, vocab, rnn_size, num_layers, batch_size, seq_length)
    operands = _operands(products, 1, np.random.default_rng(0))[0]
    tables = _tables(products)

    def on_one_thread(warm_up=False):
        with blas.one_thread():
            run_product_table(operands, *tables[warm_up], 0, len(products))

    runs = {"one": on_one_thread}
    if numba.get_num_threads() > 1:  # on one thread both are the same run
        runs["threaded"] = lambda warm_up=False: run_product_table(operands, *tables[warm_up], 0, len(products))
    medians, rounds = _interleaved_medians(runs)
    threaded = medians.get("threaded", medians["one"])
    return {"one_thread_ms": medians["one"] * 1e3, "threaded_ms": threaded * 1e3,
            "speedup": medians["one"] / threaded, "rounds": rounds}
