"""MPI ranks against threads, side by side: K ranks x T threads vs one process x K*T threads,
the same global batch, rounds alternating in one run; plus the allreduce's share of the iteration.

    python bench/mpi_speed.py                                   # char-rnn config, 2 ranks x 1 thread
    python bench/mpi_speed.py --rnn_size 512 --num_layers 3 --batch_size 128 --seq_length 100
    python bench/mpi_speed.py --ranks 2 --threads 2 --rounds 5 --json
    python bench/mpi_speed.py --overlap                         # + per-layer allreduces overlapping backward
    python bench/mpi_speed.py --scale-point --ranks 2 --threads 1   # one arm, speed.py's JSON (bench/scale)

Each round runs a fresh `mpiexec -n K` and a fresh single process (order rotating), each
timing --iters training iterations after --warmup (forward + backward + the gradient's
allreduce + RMSprop, as in training, on random tokens). Reported per arm: the median over all
timed iterations and the spread of the rounds' medians; for the ranks, the allreduce as rank 0
sees it (its own cost plus any wait for a slower rank) and the allreduce alone (ranks lined up
by a barrier first, the same buffer). --overlap adds a third arm: the gradient summed part by
part (the decoder's, then each layer's), each part's nonblocking allreduce started as soon as
backward has finished it and polled between layers, the rest waited for after backward; its
allreduce figure is that wait. Needs the [mpi] extra (mpi4py + mpich).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_rnn import affinity, distributed  # noqa: E402  (light: start no runtime)
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)
from phi_rnn.errors import UsageError  # noqa: E402
from bench.side_by_side import finish, machine_record, peak_rss_mb, versions  # noqa: E402  (light too)
from bench.speed import summary  # noqa: E402  (the numbers as speed.py reports them)

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
    p.add_argument("--policy", choices=affinity.POLICIES, default="compact", help="thread placement, as train's")
    p.add_argument("--strategy", choices=("batch", "gemm"), default="batch")
    p.add_argument("--blas", default=None,
                   help="float32 GEMM backend as train's --blas (default: phi_rnn's choice for this machine)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overlap", action="store_true",
                   help="a third arm: per-layer allreduces overlapping the backward pass")
    p.add_argument("--scale-point", action="store_true",
                   help="run only K ranks x T threads once and print speed.py's JSON with the allreduce added")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--per-layer", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rnn_size", "num_layers", "batch_size", "seq_length", "ranks", "threads", "iters", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.vocab < 2 or args.warmup < 0:
        p.error("--vocab must be >= 2 and --warmup >= 0")
    return args


class PerLayerAllreduce:
    """The overlap lever: the flat gradient summed in parts, each by its own nonblocking
    allreduce started as soon as backward has finished it. Backward (model.Network.backward)
    finishes the decoder's gradient first, then each layer's from the top; the decoder's part
    is the end of the buffer, so it carries the spare slots (the loss and the stop flags, known
    since the forward pass). Layer l's part is started when layer l-1's backward begins (the
    hook on the network's layer_backward pass), layer 0's after backward; the pending ones are
    polled (MPI_Test) at every layer so that MPI progresses them while this rank computes."""

    def __init__(self, net, world):
        self.net, self.world = net, world
        starts, offset = {}, 0
        for name, view in net.grads.views.items():
            starts[name] = offset
            offset += view.size
        ends = [starts[f"layers.{layer}.w_ih"] for layer in range(1, net.L)] + [starts["decoder.weight"]]
        layers = [(starts[f"layers.{layer}.w_ih"], ends[layer]) for layer in range(net.L)]
        # in the order backward finishes them: the decoder (with the spare slots), layers L-1 .. 0
        self.parts = [(starts["decoder.weight"], net.grads.storage.size)] + layers[::-1]
        self.requests = []
        self.hooked = None
        self.active = False  # between begin() and finish()

    def attach(self):
        """Hook the network's current layer_backward (the network makes its passes anew when the
        batch's shape changes)."""
        if self.net.passes.layer_backward is self.hooked:
            return
        layer_backward = self.net.passes.layer_backward

        def hooked(*args):
            if self.active:
                self._start_next()
            return layer_backward(*args)

        self.hooked = hooked
        self.net.passes = self.net.passes._replace(layer_backward=hooked)

    def begin(self, loss, flags):
        """Before backward: the carried values in place, nothing started."""
        import numpy as np
        distributed.pack_carried(self.net.grads, loss, flags, self.world.share)
        self.flags = len(flags)
        self.scale = np.float32(self.world.share)
        self.requests = []
        self.active = True

    def _start_next(self):
        start, stop = self.parts[len(self.requests)]
        part = self.net.grads.storage[start:stop]
        stop_data = min(stop, self.net.grads.data.size)
        if self.scale != 1.0:
            self.net.grads.storage[start:stop_data] *= self.scale
        self.requests.append(self.world.comm.Iallreduce(self.world.MPI.IN_PLACE, part, op=self.world.MPI.SUM))
        for request in self.requests[:-1]:
            request.Test()

    def finish(self):
        """After backward: start the last part, wait for all; returns (loss, flags) as
        MpiWorld.allreduce_gradient does."""
        self._start_next()
        self.active = False
        self.world.MPI.Request.Waitall(self.requests)
        return distributed.unpack_carried(self.net.grads, self.flags)


def worker(args):
    """One arm: this process (or this rank) trains on its streams; rank 0 prints JSON."""
    world = distributed.connect()
    try:
        plan = affinity.configure_rank(world.local_rank, world.local_size, args.threads, args.policy)
        start, stop = world.stream_range(args.batch_size)
    except UsageError as e:
        if world.root:
            print(f"mpi_speed.py: error: {e}", file=sys.stderr, flush=True)
        return world.finish(2, str(e))
    import numpy as np
    from phi_rnn import blas
    from phi_rnn.model import Network
    from phi_rnn.train import compile_kernels
    from phi_rnn.cli import select_blas
    select_blas(args.blas)  # --blas, or the default (measured on the first run on a machine)
    compile_kernels(args.model, args.strategy, lambda *a, **k: None)
    rng = np.random.default_rng(0)
    net = Network(args.model, args.vocab, args.rnn_size, args.num_layers, strategy=args.strategy)
    net.init_params(rng)
    T, B = args.seq_length, stop - start
    batches = [(rng.integers(0, args.vocab, (T, args.batch_size)).astype(np.int32)[:, start:stop].copy(),
                rng.integers(0, args.vocab, (T, args.batch_size)).astype(np.int32)[:, start:stop].copy())
               for _ in range(4)]
    state = net.zero_state(B)
    per_layer = PerLayerAllreduce(net, world) if args.per_layer and world.size > 1 else None
    iteration_s, allreduce_s, cpu_s = [], [], []
    for k in range(args.warmup + args.iters):
        x, y = batches[k % 4]
        c0, t0 = time.process_time(), time.perf_counter()
        loss = net.forward(x, y, state)
        if per_layer:
            per_layer.attach()
            per_layer.begin(loss, [0.0])
        net.backward(x, False)
        t1 = time.perf_counter()
        if per_layer:
            per_layer.finish()
        else:
            world.allreduce_gradient(net.grads, loss, [0.0])
        t2 = time.perf_counter()
        net.update(2e-3, 0.95, 5.0)
        t3 = time.perf_counter()
        if k >= args.warmup:
            iteration_s.append(t3 - t0)
            allreduce_s.append(t2 - t1)
            cpu_s.append(time.process_time() - c0)
    identical = per_layer and same_sums(net, per_layer, world, batches[0], state)
    alone = []
    if world.size > 1:
        for _ in range(args.iters):
            world.comm.Barrier()
            t0 = time.perf_counter()
            world.allreduce_gradient(net.grads, 0.0, [0.0])
            alone.append(time.perf_counter() - t0)
    if world.root:
        print(json.dumps({"iteration_s": iteration_s, "allreduce_s": allreduce_s, "allreduce_alone_s": alone,
                          "cpu_s": cpu_s, "gradient_floats": int(net.grads.data.size), "gemm": blas.describe_backend(),
                          "mpi": getattr(world, "library", None), "placement": plan.describe(),
                          "per_layer_identical": identical,
                          "versions": versions(), "rss_mb": peak_rss_mb()}))
    return world.finish(0)


def same_sums(net, per_layer, world, batch, state):
    """Whether the per-layer allreduces give the one allreduce's sums to the bit (the same
    gradient from the same parameters and state, summed both ways), on every rank."""
    import numpy as np
    x, y = batch
    sums = []
    for split in (True, False):
        loss = net.forward(x, y, state.copy())
        if split:
            per_layer.attach()
            per_layer.begin(loss, [0.0])
        net.backward(x, False)
        sums.append(per_layer.finish() if split else world.allreduce_gradient(net.grads, loss, [0.0]))
        sums.append(net.grads.data.copy())
    same = sums[0] == sums[2] and np.array_equal(sums[1], sums[3])
    return bool(world.comm.allreduce(int(same), op=world.MPI.MIN))


def run_arm(args, ranks, threads, per_layer=False):
    argv = [os.path.abspath(__file__), "--worker", "--model", args.model, "--rnn_size", args.rnn_size,
            "--num_layers", args.num_layers, "--batch_size", args.batch_size, "--seq_length", args.seq_length,
            "--vocab", args.vocab, "--threads", threads, "--policy", args.policy, "--strategy", args.strategy,
            "--iters", args.iters, "--warmup", args.warmup,
            *(("--blas", args.blas) if args.blas else ()), *(("--per-layer",) if per_layer else ())]
    command = [sys.executable, *map(str, argv)]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        said = next((line for line in lines if line.startswith("mpi_speed.py: error: ")), None)
        if said:  # bad input, said in one line by rank 0
            raise UsageError(said.removeprefix("mpi_speed.py: error: "))
        raise RuntimeError(f"{ranks} ranks x {threads} threads failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return [flag for flag in ("avx512f", "avx512_bf16", "avx2", "fma") if flag in flags]


def machine():
    """This machine as speed.py describes it."""
    return machine_record(affinity.read_topology(allowed=sorted(os.sched_getaffinity(0))))


def summarize(rounds, key):
    values = [v for r in rounds for v in r[key]]
    medians = [statistics.median(r[key]) * 1e3 for r in rounds]
    return {"median_ms": statistics.median(values) * 1e3 if values else None,
            "round_medians_ms": [round(m, 3) for m in medians],
            "spread_pct": 100 * (max(medians) - min(medians)) / statistics.median(medians) if medians else None}


def scale_point(args):
    """One arm, K ranks x T threads, as speed.py's --json report (what the scaling study reads),
    with the allreduce's share of the iteration under "mpi"."""
    from phi_rnn.model import gemm_flops
    arm = run_arm(args, args.ranks, args.threads)
    gflop = gemm_flops(args.model, args.vocab, args.rnn_size, args.num_layers, args.batch_size,
                       args.seq_length) / 1e9
    timing = summary(arm["iteration_s"], args, gflop, None, arm["rss_mb"], arm["cpu_s"])
    allreduce = statistics.median(arm["allreduce_s"]) * 1e3
    alone = statistics.median(arm["allreduce_alone_s"]) * 1e3 if arm["allreduce_alone_s"] else 0.0
    return {
        "machine": machine(), "versions": arm["versions"],
        "config": {k: getattr(args, k) for k in ("model", "rnn_size", "num_layers", "batch_size", "seq_length",
                                                   "vocab")},
        "threads": args.threads, "ranks": args.ranks, "policy": args.policy, "strategy": args.strategy,
        "placement": f"{args.ranks} ranks, rank 0's {arm['placement']}",
        "gemm": arm["gemm"], "gflop_per_iter": gflop, "peak_gflops": None, "small_gemm_peak_gflops": None,
        "phi_rnn": timing, "torch": None, "ratio": None, "profile": None,
        "mpi": {"library": arm["mpi"], "gradient_floats": arm["gradient_floats"], "allreduce_ms": allreduce,
                "allreduce_share": allreduce / timing["median_ms"], "allreduce_alone_ms": alone,
                "allreduce_alone_share": alone / timing["median_ms"]},
    }


def compare(args):
    """The arms side by side, their order rotating from round to round."""
    arms = {"single": (1, args.ranks * args.threads, False), "ranks": (args.ranks, args.threads, False)}
    if args.overlap:
        arms["overlap"] = (args.ranks, args.threads, True)
    rounds = {name: [] for name in arms}
    names = list(arms)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rounds[name].append(run_arm(args, *arms[name]))
    report = {
        "machine": {**machine(), "flags": cpu_flags()}, "mpi": rounds["ranks"][0]["mpi"],
        "gemm": rounds["ranks"][0]["gemm"],
        "config": {k: getattr(args, k) for k in ("model", "rnn_size", "num_layers", "batch_size", "seq_length",
                                                   "vocab", "iters", "rounds")},
        "gradient_floats": rounds["ranks"][0]["gradient_floats"],
        "single": {"layout": f"1 process x {args.ranks * args.threads} threads",
                   **summarize(rounds["single"], "iteration_s")},
    }
    layout = f"{args.ranks} ranks x {args.threads} thread{'s' * (args.threads > 1)}"
    for name in names[1:]:
        arm = report[name] = {"layout": layout + (", per-layer allreduces" if name == "overlap" else ""),
                              **summarize(rounds[name], "iteration_s"),
                              "allreduce": summarize(rounds[name], "allreduce_s"),
                              "allreduce_alone": summarize(rounds[name], "allreduce_alone_s")}
        if name == "overlap":
            arm["identical_sums"] = all(r["per_layer_identical"] for r in rounds[name])
        arm["ratio"] = arm["median_ms"] / report["single"]["median_ms"]
        arm["allreduce_share"] = arm["allreduce"]["median_ms"] / arm["median_ms"]
        arm["allreduce_alone_share"] = arm["allreduce_alone"]["median_ms"] / arm["median_ms"]
    if args.overlap:
        report["overlap_over_ranks"] = report["overlap"]["median_ms"] / report["ranks"]["median_ms"]
        # each round's two arms ran back to back: their ratio is free of the load's drift between rounds
        report["overlap_over_ranks_by_round"] = [
            round(statistics.median(o["iteration_s"]) / statistics.median(r["iteration_s"]), 4)
            for o, r in zip(rounds["overlap"], rounds["ranks"])]
    return report


def print_report(report):
    m, c = report["machine"], report["config"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['logical_cpus']} CPUs, flags {' '.join(m['flags'])}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; MPI {report['mpi']}; gemm {report['gemm']}")
    print(f"config: {c['model']} {c['num_layers']} x {c['rnn_size']}, global batch {c['batch_size']}, seq "
          f"{c['seq_length']}; gradient {report['gradient_floats']} floats; {c['rounds']} rounds x {c['iters']} "
          f"iterations, arm order rotating")
    for name in ("single", "ranks", "overlap"):
        if name not in report:
            continue
        a = report[name]
        print(f"{a['layout']:48s} median {a['median_ms']:8.2f} ms/iteration  (round medians "
              f"{', '.join(f'{v:.2f}' for v in a['round_medians_ms'])}; spread {a['spread_pct']:.1f}%)")
    for name in ("ranks", "overlap"):
        if name not in report:
            continue
        a = report[name]
        print(f"{name}: ratio to single {a['ratio']:.3f}; allreduce in the iteration (rank 0, incl. waiting for "
              f"the slower rank) {a['allreduce']['median_ms']:.3f} ms = {100 * a['allreduce_share']:.1f}%; alone "
              f"(after a barrier) {a['allreduce_alone']['median_ms']:.3f} ms = {100 * a['allreduce_alone_share']:.1f}%")
    if "overlap_over_ranks" in report:
        same = "identical to the bit" if report["overlap"]["identical_sums"] else "NOT identical"
        paired = report["overlap_over_ranks_by_round"]
        print(f"per-layer allreduces / one allreduce: {report['overlap_over_ranks']:.3f}; by round "
              f"{', '.join(f'{v:.3f}' for v in paired)} (median {statistics.median(paired):.3f}); sums {same}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        if not os.path.exists(MPIEXEC):
            raise UsageError(f"no mpiexec next to {sys.executable}: pip install -e '.[mpi]'")
        report = scale_point(args) if args.scale_point else compare(args)
    except (UsageError, RuntimeError) as e:
        print(f"mpi_speed.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return finish(report, args.json or args.scale_point, print_report)


if __name__ == "__main__":
    sys.exit(main())
