"""Text generation speed, side by side: phi_rnn's compiled batch-of-one loop vs PyTorch's
nn.LSTM stepped one character at a time (when torch is importable), each in a fresh process.

    python bench/sampling.py                          # 2 x 128 LSTM, vocab 65, one thread
    python bench/sampling.py --checkpoint cv/latest   # a trained model's weights
    python bench/sampling.py --model gru --rnn_size 512 --json
    python bench/sampling.py --precision bf16 --with-fp32   # bfloat16 beside float32

Prints median / min / max characters per second over --repeats runs of --chars characters,
microseconds per character, the weights streamed per character and the rate they stream at
(generation is bound by reading every weight once per character), and whether the kernel
granted the weights' region a transparent huge page. --with-fp32 times float32 generation
in the same process too, run by run in turn with bfloat16's, and prints the median of the
runs' bf16 / fp32 time ratios (the machine's speed changes between minutes, not between
neighbouring runs).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from phi_rnn import affinity  # noqa: E402  (light: starts no runtime)
from phi_rnn.errors import UsageError  # noqa: E402
from phi_rnn.cli import OneLineErrorParser  # noqa: E402  (one-line errors, exit 2; starts no runtime)
from bench.side_by_side import TorchSide, finish, print_machine, print_sides, run_worker, versions  # noqa: E402


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="take model and weights from this checkpoint (default: random weights)")
    p.add_argument("--model", default="lstm", choices=("lstm", "gru", "rnn"))
    p.add_argument("--rnn_size", "--rnn-size", type=int, default=128)
    p.add_argument("--num_layers", "--num-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chars", type=int, default=200_000, help="characters per timed run")
    p.add_argument("--torch_chars", "--torch-chars", type=int, default=20_000,
                   help="characters per timed PyTorch run (a Python loop per character)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="phi_rnn's weights in float32 or bfloat16 (the products' weights; refused without native bfloat16)")
    p.add_argument("--with-fp32", action="store_true",
                   help="with --precision bf16: float32 generation too, timed in turn with it in one process")
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--worker", choices=("phi_rnn", "torch"), help=argparse.SUPPRESS)
    affinity.add_thread_arguments(p)
    p.set_defaults(threads=1)
    args = p.parse_args(argv)
    for name in ("rnn_size", "num_layers", "vocab", "chars", "torch_chars", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    if args.with_fp32 and args.precision != "bf16":
        raise UsageError("--with-fp32 compares bfloat16 generation with float32's: add --precision bf16")
    return args


def random_checkpoint(args):
    import numpy as np
    from phi_rnn.checkpoint import Checkpoint
    from phi_rnn.model import Network
    net = Network(args.model, args.vocab, args.rnn_size, args.num_layers)
    net.init_params(np.random.default_rng(0))
    meta = {"model": args.model, "num_layers": args.num_layers, "rnn_size": args.rnn_size,
            "vocab": list(range(32, 32 + args.vocab))}
    return Checkpoint("random", {k: v.copy() for k, v in net.params.views.items()}, meta, {})


def huge_page_kb(address):
    """AnonHugePages of the mapping that holds `address` (/proc/self/smaps), None if unknown."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def phi_rnn_worker(args):
    import numpy as np
    from phi_rnn import checkpoint, gemm_choice
    from phi_rnn import kernels as K
    from phi_rnn.sample import Generator
    gemm_choice.use_default()  # the backend `phi_rnn sample` runs
    if args.precision == "bf16":
        from phi_rnn import bf16
        bf16.require_native()
    ck = checkpoint.load(args.checkpoint) if args.checkpoint else random_checkpoint(args)
    precisions = [args.precision] + (["fp32"] if args.with_fp32 else [])
    generators = {precision: Generator(ck, precision) for precision in precisions}
    rng = np.random.default_rng(0)
    out = np.empty(args.chars, np.int32)

    def run(gen):
        K.generate(gen.kind, rng.random(args.chars), args.temperature, False, gen.weights, gen.state, out)

    for gen in generators.values():
        run(gen)  # compiles or loads the cached kernels, warms the caches
    times = {precision: [] for precision in precisions}
    for _ in range(args.repeats):
        for precision, gen in generators.items():
            t0 = time.perf_counter()
            run(gen)
            times[precision].append(time.perf_counter() - t0)
    gen = generators[args.precision]
    table = gen.weights.w_ih0_t  # one row of it is read per character
    weight_bytes = sum(w.nbytes for w in gen.weights) - table.nbytes * (1 - 1 / len(ck.vocab))
    return {"times": times[args.precision], "fp32_times": times.get("fp32"), "chars": args.chars,
            "weight_bytes": weight_bytes,
            "huge_page_kb": huge_page_kb(table.ctypes.data), "vocab": len(ck.vocab),
            "config": dict(ck.meta, vocab=len(ck.vocab), precision=args.precision), "versions": versions()}


def torch_worker(args):
    """The same generation in PyTorch, as a char-rnn port would write it: one nn.LSTM /
    nn.GRU / nn.RNN step per character on a one-hot input, Linear, softmax, multinomial."""
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, H, L = args.vocab, args.rnn_size, args.num_layers
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[args.model](V, H, L)
    decoder = torch.nn.Linear(H, V)
    eye = torch.eye(V).view(V, 1, 1, V)

    def run(n):
        state, token = None, 0
        for _ in range(n):
            out, state = rnn(eye[token], state)
            probs = torch.softmax(decoder(out[0, 0]) / args.temperature, dim=0)
            token = int(torch.multinomial(probs, 1))

    with torch.inference_mode():
        run(200)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run(args.torch_chars)
            times.append(time.perf_counter() - t0)
    return {"times": times, "chars": args.torch_chars}


def rates(result):
    import numpy as np
    per_s = np.array([result["chars"] / t for t in result["times"]])
    return {"median_chars_per_s": float(np.median(per_s)), "min_chars_per_s": float(per_s.min()),
            "max_chars_per_s": float(per_s.max()), "us_per_char": 1e6 / float(np.median(per_s)),
            "repeats": len(per_s)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        if args.worker == "torch":
            print(json.dumps(torch_worker(args)))
            return 0
        if args.checkpoint and args.torch:
            raise UsageError("--checkpoint measures phi_rnn alone: add --no-torch")
        plan = affinity.configure(args.threads, args.policy, args.threads_per_core, args.oversubscribe)
        if args.worker == "phi_rnn":
            print(json.dumps(phi_rnn_worker(args)))
            return 0
    except UsageError as e:
        print(f"sampling.py: error: {e}", file=sys.stderr)
        return 2
    worker_argv = [a for a in argv if a != "--json"]
    try:
        mine = run_worker("phi_rnn", worker_argv, plan.threads, __file__)
    except (RuntimeError, UsageError) as e:
        print(f"sampling.py: error: {e}", file=sys.stderr)
        return 2
    topo = plan.topology.to_dict()
    report = {"machine": {"cpu": topo["model_name"], "cores": topo["cores"], "logical_cpus": topo["logical_cpus"]},
              "versions": mine["versions"], "threads": plan.threads, "placement": plan.describe(),
              "config": mine["config"], "temperature": args.temperature,
              "weight_kb_per_char": mine["weight_bytes"] / 1024, "huge_page_kb": mine["huge_page_kb"],
              "phi_rnn": rates(mine), "torch": None, "ratio": None, "fp32": None, "bf16_over_fp32": None}
    if args.with_fp32:
        report["fp32"] = rates(dict(mine, times=mine["fp32_times"]))
        report["bf16_over_fp32"] = _median_ratio(mine["times"], mine["fp32_times"])
    report["weight_gb_per_s"] = mine["weight_bytes"] * report["phi_rnn"]["median_chars_per_s"] / 1e9
    torch_side = TorchSide(worker_argv, plan.threads, __file__, summarize=rates,
                           ratios=lambda ours, theirs: {"ratio": ours["median_chars_per_s"] / theirs["median_chars_per_s"]})
    return finish(report, args.json, print_report, torch_side if args.torch else None)


def _median_ratio(times, reference):
    """The median, the lowest and the highest of the runs' time ratios, run by run."""
    import numpy as np
    ratios = np.array(times) / np.array(reference)
    return {"median": float(np.median(ratios)), "min": float(ratios.min()), "max": float(ratios.max())}


def print_report(r):
    c = r["config"]
    print_machine(r)
    huge = "unknown" if r["huge_page_kb"] is None else f"{r['huge_page_kb']} kB"
    print(f"config: {c['model']} {c['num_layers']} x {c['rnn_size']}, vocab {c['vocab']}, {c['precision']}, temperature "
          f"{r['temperature']}; {r['weight_kb_per_char']:.0f} KB of weights read per character; "
          f"huge pages granted: {huge}")
    print_sides(r, lambda s: f"median {s['median_chars_per_s']:9.0f} chars/s  (min {s['min_chars_per_s']:.0f}, "
                             f"max {s['max_chars_per_s']:.0f}, n={s['repeats']})  {s['us_per_char']:7.2f} us/char")
    if r["fp32"]:
        f, q = r["fp32"], r["bf16_over_fp32"]
        print(f"phi_rnn fp32, run in turn: median {f['median_chars_per_s']:9.0f} chars/s  (min "
              f"{f['min_chars_per_s']:.0f}, max {f['max_chars_per_s']:.0f})  {f['us_per_char']:7.2f} us/char; "
              f"bf16 / fp32 time per character {q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f} over the runs)")
    line = f"phi_rnn weights stream at {r['weight_gb_per_s']:.0f} GB/s"
    if r["ratio"] is not None:
        line += f"; phi_rnn / torch = {r['ratio']:.1f}x the characters per second"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
