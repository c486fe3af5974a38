"""The scaling study's command line: options, the points they name, and what to do with them
(list, count, run one, run all, collect). `python -m bench.scale --help`."""
import argparse
import signal
import sys
from pathlib import Path

from phi_rnn.cli import OneLineErrorParser  # one-line errors, exit 2; starts no runtime

from . import __doc__ as STUDY_DOC
from .collect import collect
from .machine import claim, slug, this_machine
from .points import (BLAS, MODELS, POLICIES, PRECISIONS, PRESETS, SCALINGS, STRATEGIES, default_threads,
                     enumerate_points, parse_config, physical_cores)
from .run import REPO_ROOT, bf16_refusal, is_done, measure_regions, run_point, run_study, write_json_atomic

DEFAULT_ITERS, DEFAULT_WARMUP = 20, 3
QUICK_ITERS, QUICK_WARMUP = 5, 1


def comma_list(choices=None, convert=str):
    def parse(text):
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [x for x in items if choices and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"invalid choice {bad[0]!r} (choose from {', '.join(choices)})")
        return list(dict.fromkeys(items))
    return parse


def count_list(what):
    def parse(text):
        try:
            counts = comma_list(convert=int)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} counts must be integers: {text!r}")
        if min(counts) < 1:
            raise argparse.ArgumentTypeError(f"{what} counts must be at least 1")
        return sorted(counts)
    return parse


def config_list(text):
    try:
        return [parse_config(token) for token in comma_list()(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def build_parser():
    parser = OneLineErrorParser(
        prog="bench.scale", description=STUDY_DOC.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configs: " + ", ".join(f"{k} = {v[0]}x{v[1]} batch {v[2]} seq {v[3]}"
                                       for k, v in PRESETS.items())
               + "; custom LAYERSxSIZE[-bBATCH][-sSEQ].")
    parser.add_argument("--threads", type=count_list("thread"),
                        help="thread counts (per rank; default: 1, 2, 4, ... up to the physical "
                             "cores, plus all cores)")
    parser.add_argument("--ranks", type=count_list("rank"), default=[1],
                        help="MPI ranks per point (default 1: no MPI); more than one runs under "
                             "mpiexec (the [mpi] extra), each rank with --threads threads")
    parser.add_argument("--configs", type=config_list, default=config_list("char-rnn,2x512"),
                        help="presets or custom configs (default: char-rnn,2x512)")
    parser.add_argument("--models", "--model", type=comma_list(MODELS), default=["lstm"],
                        help=f"of {', '.join(MODELS)} (default lstm)")
    parser.add_argument("--strategies", type=comma_list(STRATEGIES), default=list(STRATEGIES),
                        help="batch: numba threads split the batch, sequential MKL; gemm: "
                             "serial kernels, MKL-threaded GEMMs (default: both)")
    parser.add_argument("--policies", type=comma_list(POLICIES), default=["compact"],
                        help=f"affinity policies, of {', '.join(POLICIES)} (default compact)")
    parser.add_argument("--blas", type=comma_list(BLAS), default=[""],
                        help="float32 GEMM backends to compare, of libxsmm, onednn, openblas, mkl (default: "
                             "speed.py's, the fastest here)")
    parser.add_argument("--precisions", "--precision", type=comma_list(PRECISIONS), default=["fp32"],
                        help="fp32, bf16 (speed.py --precision bf16: bfloat16 GEMM operands, float32 "
                             "accumulation; one process only, measured without a model; left out on a CPU "
                             "without avx512_bf16 or amx_bf16) (default fp32)")
    parser.add_argument("--scaling", type=comma_list(SCALINGS), default=["strong"],
                        help="strong: fixed global batch; weak: batch = config batch x ranks x threads")
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--iters", type=int, help=f"timed iterations (default {DEFAULT_ITERS}, "
                                                  f"--quick {QUICK_ITERS})")
    parser.add_argument("--warmup", type=int, help=f"untimed iterations first (default "
                                                   f"{DEFAULT_WARMUP}, --quick {QUICK_WARMUP})")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run")
    parser.add_argument("--timeout", type=float, help="seconds before a point counts as failed")
    parser.add_argument("--out", type=Path,
                        help="results directory (default results/scale-<cpu model>-<cores>c-<isa>, "
                             "this machine's)")
    parser.add_argument("--set-aside", action="store_true",
                        help="when OUT holds another machine's study, move it to "
                             "OUT/set-aside-<its machine>/ instead of refusing")
    parser.add_argument("--no-report", action="store_true",
                        help="run the points, leave merging to a later --collect")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="print the points with their index")
    action.add_argument("--count", action="store_true", help="print the number of points")
    action.add_argument("--point", type=int, metavar="K", help="run point K only")
    action.add_argument("--collect", type=Path, metavar="DIR",
                        help="merge the point files in DIR into the reports, run nothing")
    action.add_argument("--print-out", action="store_true",
                        help="print the results directory these options write to")
    return parser


def resolve_options(parser, args):
    if args.threads is None:
        args.threads = default_threads(physical_cores())
    if args.iters is None:
        args.iters = QUICK_ITERS if args.quick else DEFAULT_ITERS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.iters < 1 or args.warmup < 0 or args.vocab < 2:
        parser.error("--iters must be >= 1, --warmup >= 0 and --vocab >= 2")
    if "bf16" in args.precisions and max(args.ranks) > 1:
        parser.error("--precisions bf16 measures one process: bench/mpi_speed.py has no bfloat16 "
                     "(measure --ranks above 1 in fp32 alone)")
    if args.out is None:
        args.out = REPO_ROOT / "results" / f"scale-{slug(this_machine())}"


def report_collected(out):
    rows, models, plots = collect(out)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"collected {ok} finished and {len(rows) - ok} failed points into {out}: "
          f"results.csv results.json results.md machine.json "
          + " ".join(p.name for p in plots))


def interrupt_on_sigterm():
    """PBS walltime kills arrive as SIGTERM: turn it into KeyboardInterrupt so the running
    speed.py is killed with us and no result file is written for the unfinished point."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.collect:
        if not args.collect.is_dir():
            parser.error(f"--collect: no such directory {args.collect}")
        report_collected(args.collect)
        return 0
    resolve_options(parser, args)
    if args.print_out:
        print(args.out)
        return 0
    axes = {"scaling": args.scaling, "config": args.configs, "model": args.models,
            "strategy": args.strategies, "blas": args.blas, "policy": args.policies,
            "ranks": args.ranks, "precision": args.precisions, "threads": args.threads}
    points = enumerate_points(axes, args.vocab)
    if args.count:
        print(len(points))
        return 0
    if args.list:
        for point in points:
            print(f"{point.index}\t{point.key}\tbatch {point.batch_size}")
        return 0
    if args.point is not None and not 0 <= args.point < len(points):
        parser.error(f"--point {args.point}: the study has points 0..{len(points) - 1}")
    refusal = claim(args.out, args.set_aside, write_json_atomic)
    if refusal:
        parser.error(refusal)
    interrupt_on_sigterm()
    try:
        if args.point is not None:
            return run_single(args, points[args.point])
        ran, skipped, failed, left_out = run_study(points, args.out, args.iters, args.warmup,
                                                   args.timeout)
    except KeyboardInterrupt:
        print(f"interrupted: finished points are kept in {args.out}; rerun to resume",
              file=sys.stderr)
        return 130
    print(f"{len(points)} points: {ran} run, {skipped} already done, {len(failed)} failed"
          + (f", {left_out} left out (bf16 on a CPU without it)" if left_out else ""))
    for key in failed:
        print(f"  failed: {key}")
    if not args.no_report:
        report_collected(args.out)
    return 1 if failed else 0


def run_single(args, point):
    """Job-array task: one point, no reports (--collect merges once all tasks are done). A
    bf16 point on a CPU without native bfloat16 is refused in one line (status 2)."""
    if is_done(point, args.out):
        print(f"point {point.index} {point.key}: already done in {args.out}")
        return 0
    refusal = bf16_refusal() if point.precision == "bf16" else None
    if refusal:
        print(f"bench.scale: error: point {point.index} {point.key}: {refusal}", file=sys.stderr)
        return 2
    measure_regions([point], args.out, args.timeout)
    error = run_point(point, args.out, args.iters, args.warmup, args.timeout)
    print(f"point {point.index} {point.key}: {'failed: ' + error if error else 'done'} "
          f"in {args.out}")
    return 1 if error else 0

