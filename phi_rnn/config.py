"""Every option of `train` and `sample` in one place: char-rnn's flags and defaults
(train.lua / sample.lua; `--rnn_size` and `--rnn-size` alike) plus phi_rnn's own, and the
checks that turn bad values into one clear line."""
import argparse

from phi_rnn.cells import MODELS
from phi_rnn.errors import UsageError

MAX_SIZE = {"rnn_size": 1 << 15, "num_layers": 64, "seq_length": 1 << 16, "batch_size": 1 << 16}
STRATEGIES = ("batch", "gemm")


def _add(parser, name, **kw):
    """Add --name with its dashed twin (--rnn_size / --rnn-size)."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*flags, dest=name, **kw)


def add_train_arguments(p):
    g = p.add_argument_group("data")
    _add(g, "data_dir", default="data/tinyshakespeare", help="directory holding input.txt")
    _add(g, "encoding", default="utf-8", choices=("utf-8", "bytes"),
         help="symbols are Unicode code points (utf-8) or bytes (char-rnn's exact behaviour)")
    g = p.add_argument_group("model")
    _add(g, "rnn_size", type=int, default=128, help="size of the RNN's internal state")
    _add(g, "num_layers", type=int, default=2, help="number of layers")
    _add(g, "model", default="lstm", choices=MODELS, help="cell type")
    g = p.add_argument_group("optimization")
    _add(g, "learning_rate", type=float, default=2e-3)
    _add(g, "learning_rate_decay", type=float, default=0.97)
    _add(g, "learning_rate_decay_after", type=float, default=10, help="epoch after which to decay")
    _add(g, "decay_rate", type=float, default=0.95, help="RMSprop decay")
    _add(g, "dropout", type=float, default=0.0, help="dropout on layer inputs above the first and before the decoder")
    _add(g, "seq_length", type=int, default=50, help="timesteps to unroll")
    _add(g, "batch_size", type=int, default=50)
    _add(g, "max_epochs", type=float, default=50)
    _add(g, "max_iters", type=int, default=None, help="stop after this many iterations (phi_rnn)")
    _add(g, "grad_clip", type=float, default=5, help="clamp gradients elementwise to [-clip, clip]")
    _add(g, "train_frac", type=float, default=0.95)
    _add(g, "val_frac", type=float, default=0.05)
    _add(g, "init_from", default="", help="initialize weights (and architecture) from a checkpoint")
    _add(g, "resume", default="", help="continue a run exactly from a checkpoint, or `latest`")
    _add(g, "seed", type=int, default=123)
    g = p.add_argument_group("bookkeeping")
    _add(g, "print_every", type=int, default=1)
    _add(g, "eval_val_every", type=int, default=1000)
    _add(g, "val_max_batches", type=int, default=None,
         help="evaluate only the first N validation batches, the same ones each time (default: all)")
    _add(g, "checkpoint_dir", default="cv")
    _add(g, "savefile", default="lstm")
    _add(g, "keep", type=int, default=0, help="keep the last K checkpoints and the best (0 = all)")
    g = p.add_argument_group("speed")
    _add(g, "strategy", default="batch", choices=STRATEGIES,
         help="batch: threads split the batch; gemm: MKL-threaded GEMM per step")


def train_defaults():
    """{option: default} of `train`: a value that differs was given on the command line."""
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return vars(p.parse_args([]))


def add_sample_arguments(p):
    p.add_argument("checkpoint", help="checkpoint .npz, or `latest` (in cv/)")
    _add(p, "length", type=int, default=2000, help="characters to sample")
    _add(p, "temperature", type=float, default=1.0)
    _add(p, "primetext", default="", help="text to prime the state with (echoed)")
    _add(p, "sample", type=int, default=1, choices=(0, 1), help="1 = sample, 0 = argmax")
    _add(p, "seed", type=int, default=123)


def _check(condition, message):
    if not condition:
        raise UsageError(message)


def validate_train(o):
    for name, limit in MAX_SIZE.items():
        value = getattr(o, name)
        _check(value >= 1, f"--{name} must be positive, got {value}")
        _check(value <= limit, f"--{name} {value} is absurd (limit {limit})")
    _check(o.max_epochs > 0, f"--max_epochs must be positive, got {o.max_epochs}")
    _check(o.max_iters is None or o.max_iters >= 1, f"--max_iters must be positive, got {o.max_iters}")
    _check(o.learning_rate > 0, f"--learning_rate must be positive, got {o.learning_rate}")
    _check(0 < o.learning_rate_decay <= 1, f"--learning_rate_decay must be in (0, 1], got {o.learning_rate_decay}")
    _check(0 <= o.decay_rate < 1, f"--decay_rate must be in [0, 1), got {o.decay_rate}")
    _check(0 <= o.dropout < 1, f"--dropout must be in [0, 1), got {o.dropout}")
    _check(o.grad_clip > 0, f"--grad_clip must be positive, got {o.grad_clip}")
    _check(0 < o.train_frac <= 1, f"--train_frac must be in (0, 1], got {o.train_frac}")
    _check(0 <= o.val_frac < 1, f"--val_frac must be in [0, 1), got {o.val_frac}")
    _check(o.train_frac + o.val_frac <= 1 + 1e-9,
           f"--train_frac {o.train_frac} + --val_frac {o.val_frac} exceed 1")
    _check(o.print_every >= 1, f"--print_every must be at least 1, got {o.print_every}")
    _check(o.eval_val_every >= 1, f"--eval_val_every must be at least 1, got {o.eval_val_every}")
    _check(o.val_max_batches is None or o.val_max_batches >= 1,
           f"--val_max_batches must be positive, got {o.val_max_batches}")
    _check(o.keep >= 0, f"--keep must be 0 (keep all) or positive, got {o.keep}")
    _check(not (o.init_from and o.resume), "give --init_from or --resume, not both")


def validate_sample(o):
    _check(o.length >= 1, f"--length must be positive, got {o.length}")
    _check(o.temperature > 0, f"--temperature must be positive, got {o.temperature}")
