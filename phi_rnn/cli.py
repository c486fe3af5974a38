"""`python -m phi_rnn` / `phi-rnn`: train, sample, topo, submit, data, export, plot.

Thread counts and affinity are applied (phi_rnn.affinity.configure) before anything that
starts numba, MKL or OpenMP is imported: those runtimes read their settings once, at load.
Bad input is a UsageError: one line on stderr, exit status 2.
"""
import argparse
import os
import sys

from phi_rnn import affinity, config
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

    affinity.add_topo_arguments(sub.add_parser("topo", help="show topology, thread placement and verify it"))

    from phi_rnn import submit
    submit.add_submit_arguments(sub.add_parser("submit", help="submit a PBS job (train or scale)"))

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


def _add_runtime_arguments(p):
    g = p.add_argument_group("threads")
    affinity.add_thread_arguments(g)
    g.add_argument("--deterministic", action="store_true",
                   help="MKL conditional numerical reproducibility (MKL_CBWR): identical results run to run")
    g.add_argument("--blas", metavar="libxsmm|openblas|mkl", default=None,
                   help="float32 GEMMs MKL would run on one thread: on libxsmm's JIT kernels (needs "
                        "`make native` with libxsmm installed), OpenBLAS, or MKL; STEP+SEQUENCE (e.g. "
                        "libxsmm+openblas) for the per-step and the whole-sequence products (default: the "
                        "fastest here)")


def _start_runtimes(args, log, announce=True, before=None):
    """Thread placement, then before() (work that wants every core: the OpenMP threads spin
    once they have started), then the imports that start numba/MKL, then verify what
    happened. announce=False (sample: stdout is the text) reports only mismatches."""
    if getattr(args, "deterministic", False):
        os.environ["MKL_CBWR"] = "AUTO,STRICT"
    plan = affinity.configure(args.threads, args.policy, args.threads_per_core, args.oversubscribe)
    if announce:
        log(plan.describe())
    if before is not None:
        before()
    from phi_rnn import blas, kernels  # noqa: F401  (loads MKL and numba under the plan)
    select_blas(args.blas)
    verification = affinity.verify(plan)
    if announce:
        log(verification.describe())
        log(f"gemm: {blas.describe_backend()}")
    for problem in verification.mismatches:
        log(f"warning: {problem}")
    return plan


def select_blas(name):
    """--blas: the given GEMM backend, or the default (the fastest here, set by blas)."""
    from phi_rnn import blas
    if not name:
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
            config.validate_train(args)
            early = {}
            _start_runtimes(args, _console_log, before=lambda: early.update(corpus=_encode_corpus(args, _console_log)))
            from phi_rnn.train import train
            return train(args, given, log=_console_log, corpus=early.get("corpus"))
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
            return affinity.topo_command(args)
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
