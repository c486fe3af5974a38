"""The corpus: fetching tiny-shakespeare, encoding text to token ids (Unicode code points by
default, bytes for char-rnn parity), the cached encoded corpus, and char-rnn's minibatch
loader (CharSplitLMMinibatchLoader) with its exact semantics."""
import codecs
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request

import numpy as np

from phi_rnn.errors import UsageError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
MIRROR_ENV = "PHI_RNN_DATA_MIRROR"
ENCODINGS = ("utf-8", "bytes")
SPLITS = ("train", "val", "test")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_tinyshakespeare(data_dir, mirror=None):
    """data_dir/input.txt, copied from a local mirror directory (tinyshakespeare.txt or
    input.txt in it; also $PHI_RNN_DATA_MIRROR) or downloaded from char-rnn's URL, verified
    by sha256. An existing input.txt is left alone."""
    target = os.path.join(data_dir, "input.txt")
    if os.path.isfile(target):
        return target
    os.makedirs(data_dir, exist_ok=True)
    mirror = mirror or os.environ.get(MIRROR_ENV)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".input.txt.")
    os.close(fd)
    try:
        source = None
        if mirror:
            for name in ("tinyshakespeare.txt", "input.txt"):
                if os.path.isfile(os.path.join(mirror, name)):
                    source = os.path.join(mirror, name)
                    break
            if source is None:
                raise UsageError(f"data mirror {mirror} has no tinyshakespeare.txt or input.txt")
            shutil.copyfile(source, tmp)
        else:
            source = TINYSHAKESPEARE_URL
            try:
                with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise UsageError(f"cannot download {TINYSHAKESPEARE_URL} ({e}); offline? give a "
                                 f"mirror directory with {MIRROR_ENV}=DIR or --mirror DIR") from None
        if _sha256(tmp) != TINYSHAKESPEARE_SHA256:
            raise UsageError(f"{source} does not have tiny-shakespeare's sha256 {TINYSHAKESPEARE_SHA256}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# ---------------------------------------------------------------- encoding

def encode_text(raw, encoding, path="text"):
    """bytes -> int array of symbols: Unicode code points (utf-8) or byte values."""
    if encoding == "bytes":
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}: invalid UTF-8 at byte {e.start} (line {line}); "
                         "use --encoding bytes for non-UTF-8 text") from None
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int32)


def make_decoder(encoding):
    """A function: symbols (code points or byte values) -> str, incremental, so that a UTF-8
    character whose bytes arrive in two calls stays whole (invalid bytes become U+FFFD)."""
    if encoding == "bytes":
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda symbols: decoder.decode(bytes(symbols))
    return lambda symbols: "".join(map(chr, symbols))


def text_to_symbols(text, encoding):
    return list(text.encode("utf-8")) if encoding == "bytes" else [ord(ch) for ch in text]


def describe_symbol(symbol, encoding):
    return f"byte 0x{symbol:02x}" if encoding == "bytes" else repr(chr(symbol))


def _read_input(path):
    """The corpus bytes; load_corpus has already checked that path is a file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"cannot read corpus {path}: {e.strerror}") from None


def load_corpus(path, encoding="utf-8"):
    """(ids int32 array, vocab: sorted list of symbols). The encoded corpus is cached next to
    the input (input.<encoding>.npz) and rebuilt when the input's size or mtime changes."""
    if encoding not in ENCODINGS:
        raise UsageError(f"--encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    if os.path.isdir(path):
        raise UsageError(f"corpus {path} is a directory, not a text file")
    cache = os.path.join(os.path.dirname(path) or ".", f"{os.path.basename(path)}.{encoding}.npz")
    try:
        st = os.stat(path)
    except OSError:
        raise UsageError(f"corpus {path} does not exist") from None
    stamp = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "encoding": encoding})
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["stamp"]) == stamp:
                return z["ids"].astype(np.int32), [int(s) for s in z["vocab"]]
    except (OSError, ValueError, KeyError):
        pass  # no cache or a stale/foreign one: rebuild
    raw = _read_input(path)
    if not raw:
        raise UsageError(f"corpus {path} is empty")
    symbols = encode_text(raw, encoding, path)
    vocab, ids = np.unique(symbols, return_inverse=True)
    ids = ids.astype(np.int32)
    _write_cache(cache, stamp, ids, vocab)
    return ids, [int(s) for s in vocab]


def _write_cache(cache, stamp, ids, vocab):
    """Best effort: a read-only data directory just means no cache."""
    small = ids.astype(np.uint16 if len(vocab) <= 1 << 16 else np.int32)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache) or ".", prefix=".cache.", suffix=".npz")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, stamp=np.array(stamp), ids=small, vocab=np.asarray(vocab, dtype=np.int64))
        os.replace(tmp, cache)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- batches

def split_sizes(nbatches, train_frac, val_frac):
    """char-rnn's split rule: ntrain = floor(nb*train_frac); nval = the rest when there is no
    test split, else floor(nb*val_frac); ntest = what is left."""
    test_frac = max(0.0, 1.0 - (train_frac + val_frac))
    ntrain = int(np.floor(nbatches * train_frac))
    nval = nbatches - ntrain if test_frac == 0 else int(np.floor(nbatches * val_frac))
    return ntrain, nval, nbatches - ntrain - nval


class CharLoader:
    """char-rnn's minibatch loader. The corpus, cut to a multiple of batch_size*seq_length,
    is viewed as batch_size contiguous streams; batch k is column block k of seq_length;
    targets are the inputs shifted by one with wrap-around (y[-1] = x[0]). Batches are
    stored time-major, (T, B), the layout of the kernels."""

    def __init__(self, ids, batch_size, seq_length, train_frac, val_frac):
        per_batch = batch_size * seq_length
        n = len(ids) // per_batch * per_batch
        self.nbatches = n // per_batch
        self.ntrain, self.nval, self.ntest = split_sizes(self.nbatches, train_frac, val_frac)
        if not self._usable(self.nbatches, train_frac, val_frac):
            need = next(nb for nb in range(1, 10**6) if self._usable(nb, train_frac, val_frac))
            fits = [f"--{flag} {value}" for flag, value in
                    (("seq_length", len(ids) // (batch_size * need)),
                     ("batch_size", len(ids) // (seq_length * need))) if value >= 1]
            raise UsageError(
                f"corpus too short: {len(ids)} characters make {self.nbatches} batches of "
                f"batch_size*seq_length = {per_batch}; the train/val splits need {need} "
                f"({need * per_batch} characters)" + (f"; try {' or '.join(fits)}" if fits else ""))
        data = np.asarray(ids[:n], dtype=np.int32)
        targets = np.empty_like(data)
        targets[:-1] = data[1:]
        targets[-1] = data[0]
        shape = (batch_size, self.nbatches, seq_length)
        self.x = np.ascontiguousarray(data.reshape(shape).transpose(1, 2, 0))
        self.y = np.ascontiguousarray(targets.reshape(shape).transpose(1, 2, 0))
        self.offset = {"train": 0, "val": self.ntrain, "test": self.ntrain + self.nval}
        self.size = {"train": self.ntrain, "val": self.nval, "test": self.ntest}
        self.position = {split: 0 for split in SPLITS}

    @staticmethod
    def _usable(nbatches, train_frac, val_frac):
        ntrain, nval, _ = split_sizes(nbatches, train_frac, val_frac)
        return ntrain >= 1 and (nval >= 1 or val_frac == 0)

    def next_batch(self, split):
        """(x, y), each (seq_length, batch_size) int32; cycles through the split."""
        k = self.offset[split] + self.position[split]
        self.position[split] = (self.position[split] + 1) % self.size[split]
        return self.x[k], self.y[k]

    def reset(self, split):
        self.position[split] = 0
