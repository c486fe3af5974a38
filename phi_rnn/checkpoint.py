"""Checkpoints: one .npz (no pickles) with the parameters under their documented names,
the optimizer state, the carried hidden state and a JSON `meta` string (options,
vocabulary, progress, RNG state). Writes are atomic (phi_rnn.files.atomic_write); a
`latest` file in the checkpoint directory names the newest checkpoint, `best` the one with
the lowest validation loss of the run that wrote it. A training run holds the directory's
lock file for its lifetime. Loading validates everything once, so that what comes out of
load() can be used without further checks."""
import fcntl
import json
import math
import os
import re
import socket
import zipfile

import numpy as np

from phi_rnn import config
from phi_rnn.errors import UsageError
from phi_rnn.files import atomic_write, open_regular, regular_fd
from phi_rnn.model import param_shapes

FORMAT_VERSION = 1
LATEST = "latest"
LOCK = ".lock"
RESUME_ARRAYS = ("optim.rms", "state", "train_losses")  # what --resume needs beyond the weights
META_FIELDS = ("model", "rnn_size", "num_layers", "vocab", "encoding", "options", "iteration", "epoch",
               "learning_rate", "val_losses", "loss0", "data_position", "rng_state")
SPLITS = ("train", "val", "test")
MAX_CODE_POINT = 0x10FFFF
SURROGATES = range(0xD800, 0xE000)  # not characters: no text can hold them
BEST = "best"
POINTERS = (LATEST, BEST)  # files in a checkpoint directory naming one of its checkpoints


def checkpoint_name(savefile, epoch, val_loss=None):
    """char-rnn's name: lm_<savefile>_epoch<%.2f>_<%.4f validation loss>.npz; a run stopped
    by a signal has `interrupted` in place of the loss."""
    loss = "interrupted" if val_loss is None else f"{val_loss:.4f}"
    return f"{name_prefix(savefile)}{epoch:.2f}_{loss}.npz"


def name_prefix(savefile):
    return f"lm_{savefile}_epoch"


def lock_directory(directory):
    """Take the checkpoint directory for this process: two runs in one directory would prune
    and overwrite each other's checkpoints and `latest`. flock, so the kernel releases it
    when the process ends in any way (SIGKILL included). Returns the lock's file descriptor,
    to be kept open for the run's lifetime; a directory held by another process is a
    UsageError naming the holder."""
    path = os.path.join(directory, LOCK)
    try:
        fd = regular_fd(path, os.O_RDWR | os.O_CREAT, "lock file", 0o666)
    except OSError as e:
        raise UsageError(f"cannot create the lock file {path} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise UsageError(f"checkpoint directory {directory} is in use by another training run "
                         f"({holder}); wait for it to end or give another --checkpoint_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def save(path, params, meta, rms=None, state=None, train_losses=None):
    """params: name -> array (written as float32); meta: JSON-able dict; train_losses: the
    per-iteration history (an array, not JSON: a long run's history stays small and quick to
    write). Raises OSError (disk full, permission) with the previous files untouched."""
    arrays = {name: np.asarray(a, dtype=np.float32) for name, a in params.items()}
    if rms is not None:
        arrays["optim.rms"] = np.asarray(rms, dtype=np.float32)
    if state is not None:
        arrays["state"] = np.asarray(state, dtype=np.float32)
    if train_losses is not None:
        arrays["train_losses"] = np.asarray(train_losses, dtype=np.float32)
    arrays["meta"] = np.array(json.dumps(dict(meta, format_version=FORMAT_VERSION)))
    atomic_write(path, lambda f: np.savez(f, **arrays))
    point(os.path.dirname(path) or ".", LATEST, path)


def point(directory, pointer, path):
    """Make the pointer file `pointer` (LATEST, BEST) in directory name checkpoint `path`."""
    atomic_write(os.path.join(directory, pointer), lambda f: f.write(os.path.basename(path).encode() + b"\n"))


def resolve(path, checkpoint_dir="cv"):
    """A checkpoint path, or `latest` / `best` (in checkpoint_dir, or DIR/latest, DIR/best) /
    a directory (its latest): the checkpoint named by that pointer file."""
    directory, which = None, LATEST
    if path in POINTERS:
        directory, which = checkpoint_dir, path
    elif os.path.isdir(path):
        directory = path
    elif os.path.basename(path) in POINTERS:
        directory, which = os.path.dirname(path) or ".", os.path.basename(path)
    if directory is None:
        return path
    pointer = os.path.join(directory, which)
    try:
        with open_regular(pointer, "checkpoint pointer") as f:
            raw = f.read(4096)
    except OSError:
        raise UsageError(f"no checkpoint in {directory}: {pointer} is missing") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise UsageError(f"{pointer} is corrupt: it should hold the name of a checkpoint in {directory}")
    return os.path.join(directory, name)


class Checkpoint:
    def __init__(self, path, params, meta, arrays):
        self.path, self.params, self.meta, self.arrays = path, params, meta, arrays

    @property
    def vocab(self):
        return self.meta["vocab"]


def load(path, checkpoint_dir="cv"):
    """Read and validate a checkpoint: every array's dtype, shape and values, every meta
    field's type and range. Any problem is a UsageError naming the file."""
    path = resolve(path, checkpoint_dir)
    try:
        f = open_regular(path, "checkpoint")
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path} ({e.strerror})") from None
    try:
        with f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if "meta" not in arrays:
        raise UsageError(f"{path} is not a phi_rnn checkpoint (no 'meta' entry)")
    meta = _read_meta(path, arrays.pop("meta"))
    _check_meta(path, meta)
    model, rnn_size, num_layers, vocab = meta["model"], meta["rnn_size"], meta["num_layers"], meta["vocab"]
    params = {}
    for name, shape in param_shapes(model, len(vocab), rnn_size, num_layers):
        if name not in arrays:
            raise UsageError(f"checkpoint {path} lacks parameter {name}")
        params[name] = _checked_array(path, name, arrays.pop(name), shape, "weights")
    size = sum(a.size for a in params.values())
    expected = {"optim.rms": (size,), "state": (num_layers, 2, meta["options"]["batch_size"], rnn_size),
                "train_losses": (meta["iteration"],)}
    for name, shape in expected.items():
        if name in arrays:
            arrays[name] = _checked_array(path, name, arrays[name], shape, "values")
    if "optim.rms" in arrays and np.any(arrays["optim.rms"] < 0):
        raise UsageError(f"checkpoint {path}: optim.rms holds negative values (a mean square cannot)")
    return Checkpoint(path, params, meta, arrays)


def _bad(path, what):
    return UsageError(f"checkpoint {path}: {what}")


def _read_meta(path, entry):
    if entry.shape != () or entry.dtype.kind != "U":
        raise _bad(path, f"'meta' is not a JSON string (an array of {entry.dtype}, shape {entry.shape})")
    try:
        meta = json.loads(str(entry))
    except ValueError:
        raise UsageError(f"checkpoint {path} has a corrupt 'meta' entry") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise UsageError(f"checkpoint {path} has format version {version}; this phi_rnn reads "
                         f"version {FORMAT_VERSION}")
    missing = [name for name in META_FIELDS if name not in meta]
    if missing:
        raise UsageError(f"checkpoint {path} has incomplete metadata (no {', '.join(missing)})")
    return meta


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_meta(path, meta):
    for name in ("model", "rnn_size", "num_layers", "encoding"):
        problem = config.option_problem(name, meta[name])
        if problem:
            raise _bad(path, f"meta {name} {problem}")
    options = meta["options"]
    if not isinstance(options, dict):
        raise _bad(path, "meta options is not a table of options")
    for name, value in config.RUN_OPTION_DEFAULTS.items():
        options.setdefault(name, value)
    for name in config.RUN_OPTIONS:
        if name not in options:
            raise _bad(path, f"meta options lack {name}")
        problem = config.option_problem(name, options[name])
        if problem:
            raise _bad(path, f"option {name} {problem}")
    for name in config.ARCH_OPTIONS + ("encoding",):
        if options[name] != meta[name]:
            raise _bad(path, f"option {name} {options[name]!r} disagrees with the model's {meta[name]!r}")
    _check_vocab(path, meta["vocab"], meta["encoding"])
    if "vocab_size" in meta and meta["vocab_size"] != len(meta["vocab"]):
        raise _bad(path, f"vocab_size {meta['vocab_size']!r} is not the vocabulary's {len(meta['vocab'])}")
    if not _is_int(meta["iteration"]) or meta["iteration"] < 0:
        raise _bad(path, f"iteration {meta['iteration']!r} is not a count")
    if not _is_number(meta["epoch"]) or meta["epoch"] < 0:
        raise _bad(path, f"epoch {meta['epoch']!r} is not a finite number >= 0")
    if not _is_number(meta["learning_rate"]) or meta["learning_rate"] <= 0:
        raise _bad(path, f"learning_rate {meta['learning_rate']!r} is not a positive finite number")
    for name in ("training_seconds", "wall_seconds"):  # absent: a checkpoint that did not count them
        if name in meta and not (_is_number(meta[name]) and meta[name] >= 0):
            raise _bad(path, f"{name} {meta[name]!r} is not a finite number >= 0")
    if meta["loss0"] is not None and not _is_number(meta["loss0"]):
        raise _bad(path, f"loss0 {meta['loss0']!r} is not a finite number")
    val_losses = meta["val_losses"]
    if not isinstance(val_losses, dict) or not all(
            k.isdigit() and k.isascii() and _is_number(v) for k, v in val_losses.items()):
        raise _bad(path, "val_losses is not a table of iteration: finite loss")
    fingerprint = meta.get("corpus_sha256")  # absent in checkpoints written before it existed
    if fingerprint is not None and not (isinstance(fingerprint, str) and re.fullmatch("[0-9a-f]{64}", fingerprint)):
        raise UsageError(f"checkpoint {path} has a corrupt corpus_sha256 {fingerprint!r:.80}")
    position = meta["data_position"]
    if not (isinstance(position, dict) and set(position) == set(SPLITS)
            and all(_is_int(v) and v >= 0 for v in position.values())):
        raise _bad(path, f"data_position is not a batch index >= 0 for each of {', '.join(SPLITS)}")
    try:
        np.random.default_rng().bit_generator.state = meta["rng_state"]
    except (TypeError, ValueError, KeyError, OverflowError, AttributeError):
        raise _bad(path, "rng_state is not the state of numpy's PCG64 generator") from None


def _check_vocab(path, vocab, encoding):
    top = 255 if encoding == "bytes" else MAX_CODE_POINT
    if not isinstance(vocab, list) or not vocab:
        raise _bad(path, "vocab is not a non-empty list of symbols")
    for position, symbol in enumerate(vocab):
        if not _is_int(symbol) or not 0 <= symbol <= top or (encoding != "bytes" and symbol in SURROGATES):
            kind = "byte value" if encoding == "bytes" else "Unicode character"
            raise _bad(path, f"vocab entry {position} ({symbol!r}) is not a {kind}")
        if position and symbol <= vocab[position - 1]:
            raise _bad(path, f"vocab is not in increasing order at entry {position} ({symbol!r})")


def _checked_array(path, name, array, shape, what):
    """float32 `array` of `shape` with finite values, or a UsageError."""
    if array.dtype.kind != "f":
        raise _bad(path, f"{name} holds {array.dtype} values, not floating point")
    if array.shape != shape:
        raise _bad(path, f"{name} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)):
        raise UsageError(f"checkpoint {path} has non-finite {what} in {name} (NaN or infinite)")
    return array.astype(np.float32, copy=False)


def prune(directory, savefile, keep, current):
    """Keep the last `keep` checkpoints of this run and the best by validation loss; 0 keeps
    all (char-rnn's behaviour). `current` is never removed."""
    if keep <= 0:
        return
    prefix = name_prefix(savefile)
    entries = []
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(".npz"):
            epoch_text, _, loss_text = name[len(prefix):-4].partition("_")
            try:
                entries.append((float(epoch_text), float(loss_text), name))
            except ValueError:
                continue  # interrupted checkpoints have no loss in their name: kept
    entries.sort()
    survivors = {name for _, _, name in entries[-keep:]} | {os.path.basename(current)}
    try:
        survivors.add(os.path.basename(resolve(os.path.join(directory, BEST))))
    except UsageError:
        pass  # no best yet
    if entries:
        survivors.add(min(entries, key=lambda e: e[1])[2])
    for _, _, name in entries:
        if name not in survivors:
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass  # removed by hand meanwhile
