"""Checkpoints: one .npz (no pickles) with the parameters under their documented names,
the optimizer state, the carried hidden state and a JSON `meta` string (options,
vocabulary, progress, RNG state). Writes are atomic (phi_rnn.files.atomic_write); a
`latest` file in the checkpoint directory names the newest checkpoint."""
import json
import os
import re
import zipfile

import numpy as np

from phi_rnn.errors import UsageError
from phi_rnn.files import atomic_write
from phi_rnn.model import MODELS, param_shapes

FORMAT_VERSION = 1
LATEST = "latest"


def checkpoint_name(savefile, epoch, val_loss):
    """char-rnn's name: lm_<savefile>_epoch<%.2f>_<%.4f> (validation loss), as .npz."""
    return f"lm_{savefile}_epoch{epoch:.2f}_{val_loss:.4f}.npz"


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
    atomic_write(os.path.join(os.path.dirname(path) or ".", LATEST),
                  lambda f: f.write(os.path.basename(path).encode() + b"\n"))


def resolve(path, checkpoint_dir="cv"):
    """A checkpoint path, or `latest` (in checkpoint_dir) / a directory: its newest checkpoint."""
    directory = None
    if path == LATEST:
        directory = checkpoint_dir
    elif os.path.isdir(path):
        directory = path
    elif os.path.basename(path) == LATEST:
        directory = os.path.dirname(path) or "."
    if directory is None:
        return path
    pointer = os.path.join(directory, LATEST)
    try:
        with open(pointer) as f:
            name = f.read().strip()
    except OSError:
        raise UsageError(f"no checkpoint in {directory}: {pointer} is missing") from None
    return os.path.join(directory, name)


class Checkpoint:
    def __init__(self, path, params, meta, arrays):
        self.path, self.params, self.meta, self.arrays = path, params, meta, arrays

    @property
    def vocab(self):
        return self.meta["vocab"]


def load(path, checkpoint_dir="cv"):
    """Read and validate a checkpoint; every problem is a UsageError naming the file."""
    path = resolve(path, checkpoint_dir)
    if not os.path.exists(path):
        raise UsageError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"checkpoint {path} is a directory")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if "meta" not in arrays:
        raise UsageError(f"{path} is not a phi_rnn checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError:
        raise UsageError(f"checkpoint {path} has a corrupt 'meta' entry") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise UsageError(f"checkpoint {path} has format version {version}; this phi_rnn reads "
                         f"version {FORMAT_VERSION}")
    try:
        model, vocab = meta["model"], meta["vocab"]
        rnn_size, num_layers = int(meta["rnn_size"]), int(meta["num_layers"])
    except (KeyError, TypeError, ValueError):
        raise UsageError(f"checkpoint {path} has incomplete metadata") from None
    if model not in MODELS:
        raise UsageError(f"checkpoint {path} holds an unknown model type {model!r}")
    fingerprint = meta.get("corpus_sha256")  # absent in checkpoints written before it existed
    if fingerprint is not None and not (isinstance(fingerprint, str) and re.fullmatch("[0-9a-f]{64}", fingerprint)):
        raise UsageError(f"checkpoint {path} has a corrupt corpus_sha256 {fingerprint!r:.80}")
    params = {}
    for name, shape in param_shapes(model, len(vocab), rnn_size, num_layers):
        if name not in arrays:
            raise UsageError(f"checkpoint {path} lacks parameter {name}")
        if arrays[name].shape != shape:
            raise UsageError(f"checkpoint {path}: {name} has shape {arrays[name].shape}, expected {shape}")
        params[name] = arrays.pop(name)
    return Checkpoint(path, params, meta, arrays)


def prune(directory, savefile, keep, current):
    """Keep the last `keep` checkpoints of this run and the best by validation loss; 0 keeps
    all (char-rnn's behaviour). `current` is never removed."""
    if keep <= 0:
        return
    prefix = f"lm_{savefile}_epoch"
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
    if entries:
        survivors.add(min(entries, key=lambda e: e[1])[2])
    for _, _, name in entries:
        if name not in survivors:
            os.unlink(os.path.join(directory, name))
