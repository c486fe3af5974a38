"""MPI ranks against threads, side by side: K ranks x T threads vs one process x K*T threads,
the same global batch, rounds alternating in one run; plus the allreduce's share of the iteration.

    python bench/mpi_speed.py                                   # char-rnn config, 2 ranks x 1 thread
    python bench/mpi_speed.py --rnn_size 512 --num_layers 3 --batch_size 128
    python bench/mpi_speed.py --ranks 2 --threads 2 --rounds 5 --json

Each round runs a fresh `mpiexec -n K` and a fresh single process (order alternating), each
timing --iters training iterations after --warmup (forward + backward + the gradient's
allreduce + RMSprop, as in training, on random tokens). Reported per arm: the median over all
timed iterations and the spread of the rounds' medians; for the ranks, the allreduce as rank 0
sees it (its own cost plus any wait for a slower rank) and the allreduce alone (ranks lined up
by a barrier first, the same buffer). Needs the [mpi] extra (mpi4py + mpich).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_rnn import affinity, distributed  # noqa: E402  (light: start no runtime)
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lstm", choices=("lstm", "gru", "rnn"))
    p.add_argument("--rnn_size", "--rnn-size", type=int, default=128)
    p.add_argument("--num_layers", "--num-layers", type=int, default=2)
    p.add_argument("--batch_size", "--batch-size", type=int, default=50, help="the global batch")
    p.add_argument("--seq_length", "--seq-length", type=int, default=50)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank (the single process gets ranks x this)")
    p.add_argument("--blas", default=None,
                   help="float32 GEMM backend as train's --blas (default: phi_rnn's choice for this machine)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args):
    """One arm: this process (or this rank) trains on its streams; rank 0 prints JSON."""
    world = distributed.connect()
    affinity.configure_rank(world.local_rank, world.local_size, args.threads)
    import numpy as np
    from phi_rnn import blas
    from phi_rnn.model import Network
    from phi_rnn.train import compile_kernels
    if args.blas:
        blas.set_backend(args.blas, "chosen with --blas")
    compile_kernels(args.model, "batch", lambda *a, **k: None)
    start, stop = world.streams(args.batch_size)
    rng = np.random.default_rng(0)
    net = Network(args.model, args.vocab, args.rnn_size, args.num_layers)
    net.init_params(rng)
    T, B = args.seq_length, stop - start
    batches = [(rng.integers(0, args.vocab, (T, args.batch_size)).astype(np.int32)[:, start:stop].copy(),
                rng.integers(0, args.vocab, (T, args.batch_size)).astype(np.int32)[:, start:stop].copy())
               for _ in range(4)]
    state = net.zero_state(B)
    iteration_s, allreduce_s = [], []
    for k in range(args.warmup + args.iters):
        x, y = batches[k % 4]
        t0 = time.perf_counter()
        loss = net.forward(x, y, state)
        net.backward(x, False)
        t1 = time.perf_counter()
        world.allreduce_gradient(net.grads, loss, [0.0])
        t2 = time.perf_counter()
        net.update(2e-3, 0.95, 5.0)
        t3 = time.perf_counter()
        if k >= args.warmup:
            iteration_s.append(t3 - t0)
            allreduce_s.append(t2 - t1)
    alone = []
    if world.size > 1:
        for _ in range(args.iters):
            world.comm.Barrier()
            t0 = time.perf_counter()
            world.allreduce_gradient(net.grads, 0.0, [0.0])
            alone.append(time.perf_counter() - t0)
    if world.root:
        print(json.dumps({"iteration_s": iteration_s, "allreduce_s": allreduce_s, "allreduce_alone_s": alone,
                          "gradient_floats": int(net.grads.data.size), "gemm": blas.describe_backend(),
                          "mpi": getattr(world, "library", None)}))
    return world.finish(0)


def run_arm(args, ranks, threads):
    argv = [os.path.abspath(__file__), "--worker", "--model", args.model, "--rnn_size", args.rnn_size,
            "--num_layers", args.num_layers, "--batch_size", args.batch_size, "--seq_length", args.seq_length,
            "--vocab", args.vocab, "--threads", threads, "--iters", args.iters, "--warmup", args.warmup,
            *(("--blas", args.blas) if args.blas else ())]
    command = [sys.executable, *map(str, argv)]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"mpi_speed.py: {' '.join(command[:4])}... failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return [flag for flag in ("avx512f", "avx512_bf16", "avx2", "fma") if flag in flags]


def summarize(rounds, key):
    values = [v for r in rounds for v in r[key]]
    medians = [statistics.median(r[key]) * 1e3 for r in rounds]
    return {"median_ms": statistics.median(values) * 1e3 if values else None,
            "round_medians_ms": [round(m, 3) for m in medians]}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if not os.path.exists(MPIEXEC):
        raise SystemExit(f"mpi_speed.py: no mpiexec next to {sys.executable}: pip install -e '.[mpi]'")
    ranks_rounds, single_rounds = [], []
    for r in range(args.rounds):
        arms = [(ranks_rounds, args.ranks, args.threads), (single_rounds, 1, args.ranks * args.threads)]
        for rounds, ranks, threads in (arms if r % 2 == 0 else arms[::-1]):
            rounds.append(run_arm(args, ranks, threads))
    topology = affinity.read_topology()
    ranks_it, single_it = summarize(ranks_rounds, "iteration_s"), summarize(single_rounds, "iteration_s")
    report = {
        "machine": {"cpu": topology.model_name, "cores": len(topology.cores), "logical_cpus": len(topology.cpus),
                    "flags": cpu_flags(), "hostname": platform.node()},
        "mpi": ranks_rounds[0]["mpi"], "gemm": ranks_rounds[0]["gemm"],
        "config": {k: getattr(args, k) for k in ("model", "rnn_size", "num_layers", "batch_size", "seq_length",
                                                   "vocab", "iters", "rounds")},
        "gradient_floats": ranks_rounds[0]["gradient_floats"],
        "ranks": {"layout": f"{args.ranks} ranks x {args.threads} threads", **ranks_it,
                  "allreduce": summarize(ranks_rounds, "allreduce_s"),
                  "allreduce_alone": summarize(ranks_rounds, "allreduce_alone_s")},
        "single": {"layout": f"1 process x {args.ranks * args.threads} threads", **single_it},
    }
    report["ratio"] = ranks_it["median_ms"] / single_it["median_ms"]
    report["allreduce_share"] = report["ranks"]["allreduce"]["median_ms"] / ranks_it["median_ms"]
    report["allreduce_alone_share"] = report["ranks"]["allreduce_alone"]["median_ms"] / ranks_it["median_ms"]
    if args.json:
        print(json.dumps(report))
        return 0
    m, c = report["machine"], report["config"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['logical_cpus']} CPUs, flags {' '.join(m['flags'])}; "
          f"MPI {report['mpi']}; gemm {report['gemm']}")
    print(f"config: {c['model']} {c['num_layers']} x {c['rnn_size']}, global batch {c['batch_size']}, seq "
          f"{c['seq_length']}; gradient {report['gradient_floats']} floats; {c['rounds']} rounds x {c['iters']} "
          f"iterations, arms alternating")
    for arm in ("single", "ranks"):
        a = report[arm]
        print(f"{a['layout']:26s} median {a['median_ms']:8.2f} ms/iteration  (round medians "
              f"{', '.join(f'{v:.2f}' for v in a['round_medians_ms'])})")
    ar, alone = report["ranks"]["allreduce"], report["ranks"]["allreduce_alone"]
    print(f"ratio ranks / single: {report['ratio']:.3f}")
    print(f"allreduce in the iteration (rank 0, incl. waiting for the slower rank): {ar['median_ms']:.3f} ms = "
          f"{100 * report['allreduce_share']:.1f}%; alone (after a barrier): {alone['median_ms']:.3f} ms = "
          f"{100 * report['allreduce_alone_share']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
