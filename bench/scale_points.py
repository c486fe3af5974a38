"""The scaling study's points: what one measurement is, and the fixed order of all of them.

A point is one combination of the study's dimensions. Points are enumerated in a fixed order,
the last dimension fastest, so `--point K` names the same point in every job of a job array.
A new dimension (MPI ranks, say) is a field of Point with a default (old point files keep
loading), an entry of DIMENSIONS, and a list of values from scale.py's options.
"""
import itertools
import os
import re
from dataclasses import dataclass

from phi_rnn.affinity import read_topology

# name: (num_layers, rnn_size, batch_size, seq_length)
PRESETS = {
    "char-rnn": (2, 128, 50, 50),
    "2x512": (2, 512, 50, 50),
    "3x512": (3, 512, 50, 50),
    "3x512-b128": (3, 512, 128, 100),
    "tiny": (1, 16, 4, 8),  # seconds-long points for tests and smoke runs
}
CUSTOM_CONFIG = re.compile(r"^(\d+)x(\d+)(?:-b(\d+))?(?:-s(\d+))?$")
MODELS = ("lstm", "gru", "rnn")
STRATEGIES = ("batch", "gemm")
POLICIES = ("compact", "scatter", "balanced", "none")
BLAS = ("libxsmm", "openblas", "mkl")  # "" (the default): what speed.py picks, the fastest here
SCALINGS = ("strong", "weak")
# slowest first; a point's key lists them in this order
DIMENSIONS = ("scaling", "config", "model", "strategy", "blas", "policy", "threads")
# a series: the points that differ only in their thread count
SERIES_FIELDS = DIMENSIONS[:-1]


@dataclass(frozen=True)
class Config:
    name: str
    num_layers: int
    rnn_size: int
    batch_size: int
    seq_length: int


@dataclass(frozen=True)
class Point:
    index: int
    scaling: str
    config: str
    num_layers: int
    rnn_size: int
    base_batch: int
    seq_length: int
    vocab: int
    model: str
    strategy: str
    policy: str
    threads: int
    blas: str = ""

    @property
    def batch_size(self):
        # weak scaling keeps the work per thread fixed
        return self.base_batch * self.threads if self.scaling == "weak" else self.base_batch

    @property
    def key(self):
        blas = f"-{self.blas}" if self.blas else ""
        return (f"{self.scaling}-{self.config}-{self.model}-{self.strategy}{blas}-{self.policy}"
                f"-t{self.threads:03d}")

    def speed_args(self, iters, warmup):
        return ["--model", self.model, "--rnn_size", str(self.rnn_size),
                "--num_layers", str(self.num_layers), "--batch_size", str(self.batch_size),
                "--seq_length", str(self.seq_length), "--vocab", str(self.vocab),
                "--threads", str(self.threads), "--policy", self.policy,
                "--strategy", self.strategy, "--iters", str(iters), "--warmup", str(warmup),
                "--no-torch", "--json", "--profile"] + (["--blas", self.blas] if self.blas else [])


def series_of(row):
    return tuple(row[f] for f in SERIES_FIELDS)


def parse_config(token):
    """A preset name, or LAYERSxSIZE[-bBATCH][-sSEQ] (batch and seq default to 50)."""
    if token in PRESETS:
        return Config(token, *PRESETS[token])
    match = CUSTOM_CONFIG.match(token)
    if not match:
        raise ValueError(f"unknown config {token!r}: use one of {', '.join(PRESETS)} "
                         "or LAYERSxSIZE[-bBATCH][-sSEQ], e.g. 2x256-b32-s100")
    layers, size, batch, seq = (int(g) if g else 50 for g in match.groups())
    if min(layers, size, batch, seq) < 1:
        raise ValueError(f"config {token!r}: every size must be at least 1")
    return Config(token, layers, size, batch, seq)


def physical_cores():
    """Cores this process may run on: a PBS cpuset can be smaller than the node."""
    topology = read_topology(allowed=sorted(os.sched_getaffinity(0)))
    return len(topology.usable_cores())


def default_threads(cores):
    """1, 2, 4, ... up to the core count, plus the core count itself (68 on a Phi 7250)."""
    counts = [1 << i for i in range(cores.bit_length()) if 1 << i <= cores]
    return sorted(set(counts + [cores]))


def enumerate_points(axes, vocab):
    """Every combination of axes[d] for d in DIMENSIONS (config values are Configs), in a
    fixed order, the last dimension fastest."""
    points = []
    for values in itertools.product(*(axes[d] for d in DIMENSIONS)):
        v = dict(zip(DIMENSIONS, values))
        c = v.pop("config")
        points.append(Point(index=len(points), config=c.name, num_layers=c.num_layers,
                            rnn_size=c.rnn_size, base_batch=c.batch_size,
                            seq_length=c.seq_length, vocab=vocab, **v))
    return points
