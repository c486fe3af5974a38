"""`plot`: training and validation loss against iterations (epochs on the top axis) from the
metrics logs of one or more checkpoint directories, several runs overlaid, into a PNG.
matplotlib is optional (pip install 'phi_rnn[plots]')."""
import glob
import io
import os

from phi_rnn import caches, files, metrics
from phi_rnn.errors import UsageError

SMOOTHING = 0.02  # the smoothed training curve averages over ~2% of the run's iterations


def find_logs(paths):
    """[(label, path)] of the metrics logs in the given directories (or log files)."""
    logs = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*" + metrics.SUFFIX)))
            if not found:
                raise UsageError(f"no metrics log (*{metrics.SUFFIX}) in {path}: training writes one there")
        elif os.path.exists(path):
            found = [path]  # read only if it is a regular file (metrics.read_rows)
        else:
            raise UsageError(f"{path} does not exist")
        logs += [(os.path.join(os.path.basename(os.path.dirname(os.path.abspath(f))),
                               os.path.basename(f)[:-len(metrics.SUFFIX)]), f) for f in found]
    return logs


def _read(label, path):
    try:
        rows = metrics.read_rows(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = [r for r in rows if r["train_loss"] is not None]
    if not rows:
        raise UsageError(f"{path} has no rows yet")
    return label, rows


def _smoothed(values, window):
    """Centred moving average (the ends average over what they have)."""
    import numpy as np
    values = np.asarray(values, float)
    if window <= 1:
        return values
    sums = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    lo = np.maximum(i - window // 2, 0)
    hi = np.minimum(i + window // 2 + 1, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)


def draw(runs):
    """A matplotlib Figure of the runs [(label, rows)]."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    val_points = []
    for k, (label, rows) in enumerate(runs):
        color = colors[k % len(colors)]
        its = [r["iteration"] for r in rows]
        train = [r["train_loss"] for r in rows]
        window = max(1, int(len(rows) * SMOOTHING))
        ax.plot(its, train, color=color, alpha=0.2, linewidth=0.6)
        ax.plot(its, _smoothed(train, window), color=color, linewidth=1.4,
                label=f"{label}: train" + (f" ({window}-iteration mean)" if window > 1 else ""))
        val = [(r["iteration"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
        if val:
            ax.plot(*zip(*val), color=color, linestyle="--", marker="o", markersize=4, linewidth=1.4,
                    label=f"{label}: validation (best {min(v for _, v in val):.4f})")
            val_points += [v for _, v in val]
    # the first iterations' loss (ln V) would squash everything after it: the y axis spans
    # the runs from their first 5% on
    settled = [r["train_loss"] for _, rows in runs for r in rows[len(rows) // 20:]] + val_points
    low, high = min(settled), max(settled)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per character)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    per_epoch = [r["iteration"] / r["epoch"] for r in runs[0][1] if r["epoch"]]
    if per_epoch:
        n = per_epoch[-1]
        top = ax.secondary_xaxis("top", functions=(lambda i: i / n, lambda e: e * n))
        same = all(abs(r["iteration"] / r["epoch"] - n) < 1e-6 * n for _, rows in runs for r in rows if r["epoch"])
        top.set_xlabel("epoch" if same else f"epoch of {runs[0][0]}")
    fig.tight_layout()
    return fig


def plot(paths, out):
    """Draw the logs found in `paths` into the PNG `out` (written atomically). Returns the
    labels drawn."""
    caches.configure_matplotlib()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install 'phi_rnn[plots]'") from None
    if os.path.isdir(out):
        raise UsageError(f"output {out} is a directory")
    runs = [_read(label, path) for label, path in find_logs(paths)]
    fig = draw(runs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    try:
        files.atomic_write(out, lambda f: f.write(buffer.getvalue()))
    except OSError as e:
        raise UsageError(f"cannot write {out} ({e.strerror})") from None
    return [label for label, _ in runs]


def plot_command(args, log=print):
    labels = plot(args.dirs, args.out)
    log(f"plotted {', '.join(labels)} into {args.out}")
    return 0
