"""The metrics log: one CSV row per training iteration in <checkpoint_dir>/<savefile>.metrics.csv,
for plots and other tools (`python -m phi_rnn plot`).

The last two columns, training_seconds and wall_seconds, are the run's time so far (train.py
defines them), adding up across resumed runs: the time to reach any row's loss.

A resumed run continues the same file: rows past the checkpoint it resumes from (written
before a kill, after that checkpoint) are dropped, so every iteration has exactly one row.
Rows the file lacks before that point (a log deleted or never written) are filled in from
the checkpoint's loss history, with the columns it does not keep left empty. A new run over
an existing log moves that log aside (<name>.1, .2, ...) rather than mixing two runs."""
import csv
import io
import os

from phi_rnn import files

COLUMNS = ("iteration", "epoch", "train_loss", "val_loss", "learning_rate", "grad_param_norm",
           "ms_per_iteration", "chars_per_s", "training_seconds", "wall_seconds")
# a log without the seconds columns reads with them empty
UNTIMED_COLUMNS = COLUMNS[:-2]
SUFFIX = ".metrics.csv"


def log_path(checkpoint_dir, savefile):
    return os.path.join(checkpoint_dir, savefile + SUFFIX)


def read_rows(path):
    """The rows of a metrics log as dicts of floats (None where empty), in file order; a last
    line without its newline (a run killed while writing it) is left out. Raises ValueError
    for a file that is not a metrics log, files.NotRegularFile for a FIFO, a device or a
    directory."""
    with files.open_regular(path, "metrics log", "r", newline="", encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or tuple(header) not in (COLUMNS, UNTIMED_COLUMNS):
        raise ValueError(f"{path} is not a phi_rnn metrics log (its header is {header})")
    rows = []
    for fields in reader:
        if len(fields) != len(header):
            raise ValueError(f"{path} line {reader.line_num} has {len(fields)} fields, not {len(header)}")
        row = dict.fromkeys(COLUMNS)
        row.update({name: float(value) if value else None for name, value in zip(header, fields)})
        rows.append(row)
    return rows


def _text(value):
    return "" if value is None else repr(float(value))


def _row_line(values):
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue()


def _move_aside(path):
    k = 1
    while os.path.exists(f"{path}.{k}"):
        k += 1
    os.replace(path, f"{path}.{k}")
    return f"{path}.{k}"


class MetricsLog:
    """Appends one row per iteration, flushed at once (a kill loses no written row)."""

    def __init__(self, path, chars_per_iteration, history=None, log=print):
        """history: None for a new run; for a resumed one (iteration, train_losses, val_losses
        {str(iteration): loss}, iterations_per_epoch) from its checkpoint."""
        self.path, self.chars = path, chars_per_iteration
        kept = self._continue(history, log) if history else self._start(log)
        files.atomic_write(path, lambda f: f.write("".join([_row_line(COLUMNS), *kept]).encode()))
        self._file = open(path, "a", encoding="utf-8", newline="")

    def _start(self, log):
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            log(f"a new run: the previous metrics log was moved to {_move_aside(self.path)}")
        return []

    def _continue(self, history, log):
        """The rows up to the checkpoint's iteration: the file's, completed from the history."""
        iteration, train_losses, val_losses, per_epoch = history
        existing = {}
        if os.path.exists(self.path):
            try:
                existing = {int(r["iteration"]): r for r in read_rows(self.path)}
            except (ValueError, UnicodeDecodeError) as e:
                log(f"warning: {e}; moved to {_move_aside(self.path)}, a new log continues from the checkpoint")
        lines = []
        for i in range(1, iteration + 1):
            row = existing.get(i) or {"iteration": i, "epoch": i / per_epoch, "train_loss": train_losses[i - 1],
                                      "val_loss": val_losses.get(str(i))}
            lines.append(_row_line([i] + [_text(row.get(name)) for name in COLUMNS[1:]]))
        return lines

    def append(self, iteration, epoch, losses, learning_rate, grad_param_norm, seconds):
        """losses: (train_loss, val_loss), val_loss None where not evaluated; seconds: (the
        iteration's compute time, the run's training seconds and wall seconds so far,
        cumulative over resumed runs: train.Run's clock)."""
        train_loss, val_loss = losses
        compute, training, wall = seconds
        self._file.write(_row_line([iteration, _text(epoch), _text(train_loss), _text(val_loss),
                                    _text(learning_rate), _text(grad_param_norm), _text(compute * 1e3),
                                    _text(self.chars / compute if compute > 0 else None),
                                    _text(training), _text(wall)]))
        self._file.flush()

    def close(self):
        self._file.close()
