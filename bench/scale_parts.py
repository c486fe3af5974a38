"""The parts of the model of time per iteration (scale_model.py) that only exist at p threads,
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
"""
import time

import numba
import numpy as np
from numba import njit, prange
from numba.typed import List

from phi_rnn import blas
from phi_rnn.blas import NO_TRANS, ROW_MAJOR, TRANS, set_num_threads_local, sgemm
from phi_rnn.cells import GATES

BUDGET_S = 1.5  # for each part, all rounds together: a point's own timing takes seconds
ROUNDS = (1, 7)  # at least, at most


def iteration_products(model, vocab, rnn_size, num_layers, rows, seq_length):
    """Every GEMM of a training iteration on `rows` batch rows as (calls, trans_a, m, n, k,
    beta), the form blas.product_rates takes: per layer the recurrent product forward (onto
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
    """Per product (A, B, C) as an iteration holds them: one B (the weights every block
    shares); A and C (blocks, calls, ...) of each block's own. A per-step product's A is the
    state its step just computed (one hot (m, k) per block), its C the step's own gates when
    it adds to them (forward, beta 1) or one hot gradient (backward, beta 0). All written
    here, so that no timed run pays the page faults of their first touch."""
    operands = List()
    for calls, trans_a, m, n, k, beta in products:
        shape_a = (blocks, 1, k, m) if trans_a else (blocks, 1, m, k)
        c_calls = calls if beta else 1
        operands.append((rng.standard_normal(shape_a, dtype=np.float32),
                         rng.standard_normal((k, n), dtype=np.float32),
                         np.full((blocks, c_calls, m, n), 0.5, np.float32)))
    return operands


def _table(products, warm_up=False):
    """(products as an int64 table, their betas); warm_up: one call of each."""
    return (np.array([(1 if warm_up else calls, int(t), m, n, k) for calls, t, m, n, k, _ in products], np.int64),
            np.array([beta for *_, beta in products], np.float32))


@njit(cache=True)
def _run_block(operands, table, betas, block):
    """Every call of the table on block `block`'s operands, through the kernels' GEMM."""
    one = np.float32(1.0)
    for p in range(table.shape[0]):
        trans_a = TRANS if table[p, 1] else NO_TRANS
        m, n, k = table[p, 2], table[p, 3], table[p, 4]
        a_all, b, c_all = operands[p]
        for i in range(table[p, 0]):  # a step's A, C: the call's own, or the one hot one
            a, c = a_all[block, i % a_all.shape[1]], c_all[block, i % c_all.shape[1]]
            sgemm(ROW_MAJOR, trans_a, NO_TRANS, m, n, k, one, a.ctypes.data, a.shape[1], b.ctypes.data,
                  b.shape[1], betas[p], c.ctypes.data, c.shape[1])


@njit(parallel=True, cache=True)
def _run_blocks(operands, table, betas, blocks):
    """Blocks 0..blocks-1 at once, one per thread, each on one thread as in the batch
    strategy's block kernels (kernels.layer_forward_blocks)."""
    for block in prange(blocks):
        set_num_threads_local(1)
        _run_block(operands, table, betas, block)
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
    tables = {False: _table(products), True: _table(products, warm_up=True)}
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
    operands = _operands(products, 1, np.random.default_rng(0))
    tables = {False: _table(products), True: _table(products, warm_up=True)}

    def on_one_thread(warm_up=False):
        with blas.one_thread():
            _run_block(operands, *tables[warm_up], 0)

    runs = {"one": on_one_thread}
    if numba.get_num_threads() > 1:  # on one thread both are the same run
        runs["threaded"] = lambda warm_up=False: _run_block(operands, *tables[warm_up], 0)
    medians, rounds = _interleaved_medians(runs)
    threaded = medians.get("threaded", medians["one"])
    return {"one_thread_ms": medians["one"] * 1e3, "threaded_ms": threaded * 1e3,
            "speedup": medians["one"] / threaded, "rounds": rounds}
