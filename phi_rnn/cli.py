"""`python -m phi_rnn` / `phi-rnn`: train, sample, topo, submit, data, export, plot.

Thread counts and affinity are applied (phi_rnn.affinity.configure) before anything that
starts numba, MKL or OpenMP is imported: those runtimes read their settings once, at load.
Bad input is a UsageError: one line on stderr, exit status 2.
"""
import argparse
import json
import os
import sys

from phi_rnn import affinity, config, distributed
from phi_rnn.errors import UsageError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not usage + error) and exit status 2,
    as every bad input in phi_rnn. The CLI and the bench/ scripts parse with it; importing
    it starts no numba, MKL or OpenMP runtime."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser():
    p = OneLineErrorParser(prog="phi_rnn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a char-rnn model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_train_arguments(t)
    _add_runtime_arguments(t)

    s = sub.add_parser("sample", help="generate text from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config.add_sample_arguments(s)
    _add_runtime_arguments(s)

    _add_topo_arguments(sub.add_parser("topo", help="show topology, thread placement and verify it"))

    from phi_rnn import submit
    submit.add_submit_arguments(sub.add_parser("submit", help="submit a Slurm or PBS job (train or scale)"))

    d = sub.add_parser("data", help="fetch tiny-shakespeare into --data_dir (sha256-verified)")
    d.add_argument("--data_dir", "--data-dir", default="data/tinyshakespeare")
    d.add_argument("--mirror", default=None, help="local directory holding tinyshakespeare.txt (offline nodes)")

    e = sub.add_parser("export", help="write a checkpoint's model as ONNX or for PyTorch (phi_rnn/export.py)")
    e.add_argument("checkpoint", help="checkpoint .npz, `latest` or `best` (in cv/), or a checkpoint directory")
    e.add_argument("--to", required=True, help="onnx (LSTM, GRU, RNN) or torch (LSTM, RNN)")
    e.add_argument("out", help="file to write (replaced atomically)")

    g = sub.add_parser("plot", help="training and validation loss curves of runs into a PNG (phi_rnn/plot.py)")
    g.add_argument("dirs", nargs="+", metavar="DIR", help="checkpoint directories (their *.metrics.csv) or logs")
    g.add_argument("-o", "--out", default="loss.png", help="PNG to write")
    return p


def _add_topo_arguments(p):
    affinity.add_thread_arguments(p)
    p.add_argument("--ranks-per-node", "--ranks_per_node", dest="ranks_per_node", type=int, default=None,
                   help="show the placement of K MPI ranks on this node (each its own cores); under "
                        "mpiexec every rank places and verifies its own share")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _topo(args):
    """`phi_rnn topo`: topology, plan, env, verified placement.  Exit 0 when verified, else 1."""
    world = distributed.connect()
    if world.size == 1 and args.ranks_per_node is not None:
        if args.ranks_per_node < 1:
            raise UsageError(f"--ranks-per-node must be positive, got {args.ranks_per_node}")
        node = affinity.read_topology(allowed=affinity.node_cpus())
        plans = affinity.rank_plans(node, args.ranks_per_node, args.threads, args.policy, args.threads_per_core,
                                    args.oversubscribe)
        if args.json:
            print(json.dumps({"topology": node.to_dict(), "ranks": [
                {"plan": plan.to_dict(), "cpus": plan.topology.allowed, "env": plan.env} for plan in plans]}))
            return 0
        print(f"topology: {node.summary()}")
        for rank, plan in enumerate(plans):
            print(f"rank {rank}: CPUs {affinity.format_cpu_list(plan.topology.allowed)}; {plan.describe()}")
            print(f"rank {rank} env: " + " ".join(f"{k}={v}" for k, v in plan.env.items()))
        print(f"(the plan only: under `mpiexec -n {args.ranks_per_node}` every rank verifies its own)")
        return 0
    plan = affinity.configure_rank(world.local_rank, world.local_size, args.threads, args.policy,
                                   args.threads_per_core, args.oversubscribe)
    verification = affinity.verify(plan)  # imports numba: the runtimes start under the env just set
    if args.json and world.size == 1:
        print(json.dumps({"topology": plan.topology.to_dict(), "plan": plan.to_dict(), "env": plan.env,
                          "verification": verification.to_dict()}))
    elif world.size == 1:
        print(f"topology: {plan.topology.summary()}")
        print(plan.describe())
        print("env: " + " ".join(f"{k}={v}" for k, v in plan.env.items()) + f" (unset: {' '.join(plan.unset)})")
        print(verification.describe())
    else:
        for line in world.describe(f"pid {os.getpid()}; {plan.describe()}; {verification.describe()}", plan.threads):
            print(line, flush=True)
    return world.finish(0 if verification.ok else 1)


def _add_runtime_arguments(p):
    g = p.add_argument_group("threads")
    affinity.add_thread_arguments(g)
    g.add_argument("--deterministic", action="store_true",
                   help="MKL conditional numerical reproducibility (MKL_CBWR): identical results run to run")
    g.add_argument("--blas", metavar="libxsmm|onednn|openblas|mkl", default=None,
                   help="float32 GEMMs MKL would run on one thread: on libxsmm's JIT kernels (needs "
                        "`make native` with libxsmm installed), oneDNN's, OpenBLAS, or MKL; STEP+SEQUENCE "
                        "(e.g. libxsmm+onednn) for the per-step and the whole-sequence products (default: the "
                        "fastest here)")


def _start_runtimes(args, log, announce=True, before=None, world=distributed.Single()):
    """Thread placement, then before() (work that wants every core: the OpenMP threads spin
    once they have started), then the imports that start numba/MKL, then verify what
    happened. announce=False (sample: stdout is the text) reports only mismatches. An MPI rank
    places its threads on its own share of the node's cores and rank 0 reports every rank's."""
    if getattr(args, "deterministic", False):
        os.environ["MKL_CBWR"] = "AUTO,STRICT"
    plan = affinity.configure_rank(world.local_rank, world.local_size, args.threads, args.policy,
                                   args.threads_per_core, args.oversubscribe)
    if announce:
        log(plan.describe())
    if before is not None:
        before()
    from phi_rnn import blas, kernels  # noqa: F401  (loads MKL and numba under the plan)
    select_blas(args.blas)
    bfloat16 = getattr(args, "precision", "fp32") == "bf16"
    if bfloat16:
        from phi_rnn import bf16
        if getattr(args, "command", "train") == "sample":
            bf16.require_native()  # generation runs no bfloat16 GEMM
        else:
            select_bf16()
    verification = affinity.verify(plan)
    if announce:
        log(verification.describe())
        log(f"gemm: {blas.describe_backend()}")
        if bfloat16:
            log(f"gemm bfloat16: {bf16.describe_backend()} (--precision bf16, on {' and '.join(bf16.native_features())})"
                + _per_step_products(args))
    for problem in verification.mismatches:
        log(f"warning: {problem}")
    rank_line = (f"pid {os.getpid()}, {plan.threads} thread{'s' * (plan.threads != 1)} on CPUs "
                 f"{affinity.format_cpu_list(verification.cpus or plan.topology.allowed)}, "
                 + ("verified" if verification.ok else "NOT verified: " + "; ".join(verification.mismatches)))
    for line in world.describe(rank_line, plan.threads):
        log(line)
    return plan


def _train(args, given):
    """`train`, in one process or as one MPI rank. Only rank 0 prints; every rank exits with the
    same status (phi_rnn.distributed.MpiWorld.finish aborts the job when one rank stops alone)."""
    try:
        world = distributed.connect()
    except UsageError as e:
        if distributed.launched_rank() == 0:
            print(f"phi_rnn: error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    log = _console_log if world.root else (lambda message, flush=True: None)
    try:
        config.validate_train(args)
        early = {}
        # rank 0 encodes a new corpus into its token cache alone; the other ranks then map it
        encode = lambda: early.update(corpus=world.root_first(lambda: _encode_corpus(args, log)))  # noqa: E731
        _start_runtimes(args, log, before=encode, world=world)
        from phi_rnn.train import train
        status = train(args, given, log=log, corpus=early.get("corpus"), world=world)
    except UsageError as e:
        if world.root:
            print(f"phi_rnn: error: {e}", file=sys.stderr, flush=True)
        return world.finish(e.exit_status, str(e))
    except KeyboardInterrupt:
        return world.finish(130)
    except BaseException:
        if world.size == 1:
            raise
        import traceback
        traceback.print_exc()
        return world.finish(1)
    return world.finish(status)


def _per_step_products(args):
    """'; LSTM per-step products: <kernel>' for a bfloat16 LSTM's training (model.Network
    lays its weights out for that kernel), else ''."""
    if getattr(args, "model", None) != "lstm":
        return ""
    from phi_rnn import amx
    kernel = "phi_rnn's AMX tile kernel" if amx.runs_lstm_steps(args.rnn_size) else "MKL's packed product"
    return "; LSTM per-step products: " + kernel


def select_bf16():
    """--precision bf16: refused without native bfloat16 (bf16.require_native), else the
    bfloat16 GEMMs on the fastest library here (measured on the first run on a machine:
    gemm_choice)."""
    from phi_rnn import bf16, gemm_choice
    bf16.require_native()
    gemm_choice.use_default("bf16")


def select_blas(name):
    """--blas: the given GEMM backend, or the default (the fastest here, measured on the
    first run on a machine: gemm_choice)."""
    from phi_rnn import blas, gemm_choice
    if not name:
        gemm_choice.use_default()
        return
    try:
        blas.set_backend(name, "chosen with --blas")
    except ValueError as e:
        raise UsageError(f"--blas {name}: {e}") from None


def _detach_stdout():
    """Point stdout at /dev/null: its reader is gone (a closed terminal, `| head`), and
    Python's flush at exit would fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _console_log(message, flush=True):
    """Training's progress lines. A closed terminal (EIO) or pipe (EPIPE) must not stop the
    run, so that its SIGHUP or the end still writes a checkpoint: later lines go nowhere."""
    try:
        print(message, flush=flush)
    except OSError:
        _detach_stdout()


def _encode_corpus(args, log):
    """Load the corpus (encoding it into its token cache if need be) before the runtimes
    start, so that the encoder has every core. --resume may bring the checkpoint's
    encoding: train loads it then."""
    if args.resume:
        return None
    from phi_rnn import data
    return data.load_corpus(os.path.join(args.data_dir, "input.txt"), args.encoding, log)


def main(argv=None):
    args = _parser().parse_args(argv)
    given = config.given_flags(args)
    try:
        if args.command == "train":
            return _train(args, given)
        if args.command == "sample":
            config.validate_sample(args)
            _start_runtimes(args, lambda m: print(m, file=sys.stderr), announce=False)
            from phi_rnn.sample import sample
            try:
                return sample(args)
            except BrokenPipeError:  # `sample ... | head`: the reader has what it wanted
                _detach_stdout()
                return 0
        if args.command == "topo":
            return _topo(args)
        if args.command == "submit":
            from phi_rnn import submit
            return submit.submit_command(args)
        if args.command == "data":
            from phi_rnn.data import ensure_tinyshakespeare
            print(ensure_tinyshakespeare(args.data_dir, args.mirror))
            return 0
        if args.command == "export":
            from phi_rnn import export
            return export.export_command(args)
        if args.command == "plot":
            from phi_rnn import plot
            return plot.plot_command(args)
    except UsageError as e:
        print(f"phi_rnn: error: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    return 2
