"""The corpus: fetching tiny-shakespeare; encoding input.txt to token ids in one streaming
pass (Unicode code points by default, bytes for char-rnn parity) into a memory-mapped token
cache; and char-rnn's minibatch loader (CharSplitLMMinibatchLoader) with its exact
semantics, gathering each batch from that map when it is needed.

Memory is O(chunk), not O(corpus): the encoder holds one chunk of the input and its ids,
the loader only the map (page cache, shared and evictable) and the batch it returns."""
import codecs
import concurrent.futures
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request

import numba
import numpy as np

from phi_rnn import files
from phi_rnn.errors import UsageError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
MIRROR_ENV = "PHI_RNN_DATA_MIRROR"
ENCODINGS = ("utf-8", "bytes")
SPLITS = ("train", "val", "test")

CHUNK_BYTES = 16 << 20  # input read per step of the encoder; its ids take 4x that while in flight
CACHE_FORMAT = 1
CACHE_MAGIC = b"phi_rnn token cache\n"
HEADER_BYTES = 4096  # magic + JSON, space-padded; the ids start page-aligned after it
SYMBOL_LIMIT = {"utf-8": 0x110000, "bytes": 0x100}
# A corpus whose ctime is this close to the moment it was read may change again within the
# same timestamp tick without its ctime moving (coarse filesystem clocks): such a cache is
# always verified by its content hash instead of trusted by its stat.
RACY_NS = 2_000_000_000


def _sha256_of(f):
    """sha256 (hex) of what is left to read in file f."""
    digest = hashlib.sha256()
    block = bytearray(1 << 20)
    while True:
        got = f.readinto(block)
        if not got:
            return digest.hexdigest()
        digest.update(memoryview(block)[:got])


def ensure_tinyshakespeare(data_dir, mirror=None):
    """data_dir/input.txt, copied from a local mirror directory (tinyshakespeare.txt or
    input.txt in it; also $PHI_RNN_DATA_MIRROR) or downloaded from char-rnn's URL, verified
    by sha256. An existing input.txt is left alone (one that is not a regular file is
    refused)."""
    target = os.path.join(data_dir, "input.txt")
    if os.path.lexists(target):
        try:
            files.open_regular(target, "corpus").close()
            return target
        except FileNotFoundError:
            pass  # a symlink to nothing: replaced
        except OSError:
            return target  # there but unreadable: train says so
    mirror = mirror or os.environ.get(MIRROR_ENV)
    source = _mirror_file(mirror) if mirror else None
    try:
        os.makedirs(data_dir, exist_ok=True)
        files.atomic_write(target, lambda out: _fetch(source, out))
    finally:
        if source is not None:
            source.close()
    return target


def _mirror_file(mirror):
    """The mirror's copy of tiny-shakespeare (tinyshakespeare.txt, else input.txt), open."""
    path = next((os.path.join(mirror, name) for name in ("tinyshakespeare.txt", "input.txt")
                 if os.path.lexists(os.path.join(mirror, name))), None)
    if path is None:
        raise UsageError(f"data mirror {mirror} has no tinyshakespeare.txt or input.txt")
    try:
        return files.open_regular(path, "data mirror file")
    except OSError as e:
        raise UsageError(f"cannot read data mirror file {path} ({e.strerror})") from None


def _fetch(source, out):
    """Copy tiny-shakespeare from the open mirror file `source` (None: from char-rnn's URL)
    into the file `out`, and verify its sha256."""
    if source is not None:
        shutil.copyfileobj(source, out)
    else:
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as r:
                shutil.copyfileobj(r, out)
        except OSError as e:
            raise UsageError(f"cannot download {TINYSHAKESPEARE_URL} ({e}); offline? give a "
                             f"mirror directory with {MIRROR_ENV}=DIR or --mirror DIR") from None
    out.flush()
    with open(out.fileno(), "rb", closefd=False) as f:
        f.seek(0)
        if _sha256_of(f) != TINYSHAKESPEARE_SHA256:
            name = TINYSHAKESPEARE_URL if source is None else source.name
            raise UsageError(f"{name} does not have tiny-shakespeare's sha256 {TINYSHAKESPEARE_SHA256}")


# ---------------------------------------------------------------- symbols

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


def token_dtype(vocab_size):
    """The smallest unsigned type that holds ids 0 .. vocab_size-1."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------- streaming encoder

@numba.njit(cache=True, nogil=True)
def _known_bytes(buf, utf8, lut, out):
    """The common case, kept a tight loop (one index for both arrays: LLVM vectorises it):
    one-byte symbols already in the vocabulary. Returns how many it translated."""
    for j in range(buf.size):
        b = buf[j]
        if utf8 and b >= 0x80:
            return j
        ident = lut[b]
        if ident < 0:
            return j
        out[j] = ident
    return buf.size


@numba.njit(cache=True, nogil=True)
def _encode_chunk(buf, n, final, utf8, lut, symbols, nseen, out):
    """Symbols of buf[:n] (strict UTF-8 code points, as Python's decoder, or bytes) to ids in
    first-seen order: lut[symbol] is its id (-1 unseen), symbols[id] the symbol. Writes the
    ids to out. Returns (ids written, bytes consumed, error offset or -1, symbols seen); an
    incomplete character at the end of a non-final chunk is left unconsumed for the next."""
    i = 0
    count = 0
    while i < n:
        b = buf[i]
        cp = np.int64(b)
        step = 1
        if b < 0x80 or not utf8:
            if i + 1 < n and (buf[i + 1] < 0x80 or not utf8) and lut[b] >= 0:
                run = _known_bytes(buf[i:n], utf8, lut, out[count:])  # a run of known one-byte symbols
                i += run
                count += run
                continue
        else:
            lo, hi = 0x80, 0xBF  # the range of the second byte (no overlongs, surrogates, > U+10FFFF)
            if 0xC2 <= b <= 0xDF:
                need, cp = 1, np.int64(b & 0x1F)
            elif 0xE0 <= b <= 0xEF:
                need, cp = 2, np.int64(b & 0x0F)
                lo = 0xA0 if b == 0xE0 else 0x80
                hi = 0x9F if b == 0xED else 0xBF
            elif 0xF0 <= b <= 0xF4:
                need, cp = 3, np.int64(b & 0x07)
                lo = 0x90 if b == 0xF0 else 0x80
                hi = 0x8F if b == 0xF4 else 0xBF
            else:
                return count, i, i, nseen
            for j in range(1, need + 1):
                if i + j >= n:
                    return count, i, (i if final else -1), nseen
                c = buf[i + j]
                if c < (lo if j == 1 else 0x80) or c > (hi if j == 1 else 0xBF):
                    return count, i, i, nseen
                cp = (cp << 6) | (c & 0x3F)
            step = need + 1
        ident = lut[cp]
        if ident < 0:
            ident = nseen
            lut[cp] = nseen
            symbols[nseen] = cp
            nseen += 1
        out[count] = ident
        count += 1
        i += step
    return count, n, -1, nseen


@numba.njit(cache=True, nogil=True)
def _translate(ids, table, out):
    """out[i] = table[ids[i]] (out may be ids)."""
    for i in range(ids.size):
        out[i] = table[ids[i]]


class Corpus:
    """An encoded corpus: ids (a read-only memory map of unsigned ints, or an array),
    vocab (sorted symbols), sha256 (of the input's bytes: the corpus's fingerprint)."""

    def __init__(self, ids, vocab, sha256, cache=None):
        self.ids, self.vocab, self.sha256, self.cache = ids, vocab, sha256, cache
        self._new_stat = None

    def keep_stat(self):
        """Record in the cache the input's stat that its sha256 has just been checked
        against, so that later runs trust it without hashing. Called once a run is under
        way: a run refused for bad input leaves every file as it was."""
        if self._new_stat is not None:
            _refresh_stat(self.cache, *self._new_stat)
            self._new_stat = None


def _stat_key(st):
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _open_input(path):
    """(file, stat) of the corpus, refusing anything but a regular file."""
    try:
        f = files.open_regular(path, "corpus", buffering=0)
    except FileNotFoundError:
        raise UsageError(f"corpus {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read corpus {path}: {e.strerror}") from None
    return f, os.fstat(f.fileno())


def _progress(path, total, log):
    """tqdm's bar on a terminal; otherwise a log line now and one at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, unit="B", unit_scale=True, desc=f"encoding {os.path.basename(path)}",
                    leave=False)
    log(f"encoding {path} ({total / 1e6:.1f} MB)...", flush=True)
    return None


def _line_of(path, offset):
    with files.open_regular(path, "corpus") as f:
        lines, left = 1, offset
        while left > 0:
            block = f.read(min(left, CHUNK_BYTES))
            if not block:
                break
            lines += block.count(b"\n")
            left -= len(block)
    return lines


def _ranks(first_seen):
    """rank[i] = the position of symbol first_seen[i] in the sorted vocabulary."""
    rank = np.empty(len(first_seen), np.int64)
    rank[np.argsort(first_seen, kind="stable")] = np.arange(len(first_seen))
    return rank


def _pwrite(fd, array, offset):
    view = memoryview(array).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread(fd, array, offset):
    view = memoryview(array).cast("B")
    while view:
        data = os.pread(fd, len(view), offset)
        if not data:
            raise OSError(5, "token file shorter than written")
        view[:len(data)] = data
        view, offset = view[len(data):], offset + len(data)


def _encode(f, st, path, encoding, fd, log, chunk_bytes):
    """Stream the corpus `f` into file descriptor fd (ids from HEADER_BYTES). A second
    thread hashes each chunk and writes the previous one's ids while this one decodes the
    next (two id buffers take turns; its tasks run in order, so when a chunk's hash is done
    the write before it is too). Each chunk is written as ranks in the sorted vocabulary
    known so far, in the smallest dtype that holds it (what was written is widened in place
    when the vocabulary outgrows it). Returns (first-seen symbols, dtype, sha256, chunks:
    [(first id, count, symbols known when written)])."""
    utf8 = encoding == "utf-8"
    lut = np.full(SYMBOL_LIMIT[encoding], -1, np.int32)
    symbols = np.zeros(SYMBOL_LIMIT[encoding], np.int64)
    buf = np.empty(chunk_bytes + 4, np.uint8)
    ids = np.empty(chunk_bytes + 4, np.int32)
    digest = hashlib.sha256()
    dtype, count, nseen, carry, offset = token_dtype(1), 0, 0, 0, 0
    rank, chunks = np.zeros(0, np.int64), []
    ranked = [np.empty(chunk_bytes + 4, np.uint32) for _ in range(2)]  # a chunk's ids in the file's dtype
    writing = None
    try:
        # the disk blocks for uint8 ids, at once: writes into a preallocated file are several
        # times faster on ext4 than ones that allocate as they go, and a full disk shows now
        os.posix_fallocate(fd, 0, HEADER_BYTES + st.st_size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
    bar = _progress(path, st.st_size, log)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1) as helper:
        while True:
            got = f.readinto(memoryview(buf)[carry:carry + min(chunk_bytes, st.st_size - offset)]) or 0
            hashing = helper.submit(digest.update, memoryview(buf)[carry:carry + got])
            final = offset + got >= st.st_size
            if got == 0 and not final:
                raise UsageError(f"corpus {path} shrank while it was being read; run again once it is complete")
            n, used, error, nseen = _encode_chunk(buf, carry + got, final, utf8, lut, symbols, nseen, ids)
            hashing.result()
            if writing is not None:
                writing.result()  # done (it ran before the hash); raises its OSError (a full disk)
            if error >= 0:
                at = offset - carry + error
                raise UsageError(f"{path}: invalid UTF-8 at byte {at} (line {_line_of(path, at)}); "
                                 "use --encoding bytes for non-UTF-8 text")
            if nseen != len(rank):
                rank = _ranks(symbols[:nseen])
            if token_dtype(nseen) != dtype:
                _widen(fd, dtype, token_dtype(nseen), count)
                dtype = token_dtype(nseen)
            out = ranked[len(chunks) % 2].view(dtype)[:n]
            _translate(ids[:n], rank, out)
            writing = helper.submit(_pwrite, fd, out, HEADER_BYTES + count * dtype.itemsize)
            chunks.append((count, n, nseen))
            count += n
            offset += got
            carry = carry + got - used
            buf[:carry] = buf[used:used + carry]
            if bar is not None:
                bar.update(got)
            if final:
                break
        writing.result()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    log(f"encoded {path}: {count} symbols, vocabulary {nseen}, {st.st_size / 1e6:.1f} MB in {seconds:.1f} s "
        f"({st.st_size / 1e6 / max(seconds, 1e-9):.0f} MB/s)", flush=True)
    return symbols[:nseen], dtype, digest.hexdigest(), chunks


def _widen(fd, dtype, wider, count):
    """Rewrite the `count` ids written so far in a wider dtype, in place: from the end
    backwards, so that no block is overwritten before it is read."""
    step = CHUNK_BYTES // wider.itemsize
    for start in range((count - 1) // step * step, -1, -step):
        block = np.empty(min(step, count - start), dtype)
        _pread(fd, block, HEADER_BYTES + start * dtype.itemsize)
        _pwrite(fd, block.astype(wider), HEADER_BYTES + start * wider.itemsize)


def _finish(fd, first_seen, dtype, chunks, header):
    """Rewrite, in place, the chunks written before the vocabulary was complete as ranks in
    the final one (usually only the first few MB), append the vocabulary, write the header.
    Returns the sorted vocabulary."""
    final_rank = _ranks(first_seen)
    for start, n, known in chunks:
        if known == len(first_seen):
            continue
        table = np.empty(known, dtype)  # rank among the first `known` symbols -> final rank
        table[_ranks(first_seen[:known])] = final_rank[:known]
        part = np.empty(n, dtype)
        _pread(fd, part, HEADER_BYTES + start * dtype.itemsize)
        _translate(part, table, part)
        _pwrite(fd, part, HEADER_BYTES + start * dtype.itemsize)
    count = sum(n for _, n, _ in chunks)
    vocab = np.sort(first_seen)
    _pwrite(fd, vocab.astype("<u4"), HEADER_BYTES + count * dtype.itemsize)
    os.ftruncate(fd, HEADER_BYTES + count * dtype.itemsize + 4 * len(vocab))  # less than preallocated
    header.update(dtype=dtype.name, count=count, vocab_size=len(vocab))
    _write_header(fd, header)
    return vocab


def _write_header(fd, header):
    text = CACHE_MAGIC + json.dumps(header).encode()
    _pwrite(fd, np.frombuffer(text.ljust(HEADER_BYTES - 1) + b"\n", np.uint8), 0)


def _read_cache(cache, encoding):
    """(header, ids memory map, vocab) of a well-formed token cache, else None: a missing,
    truncated, zero-length, foreign or otherwise broken cache is simply rebuilt. One that is
    not a regular file (a FIFO, a device, a directory) is a files.NotRegularFile: it is not
    phi_rnn's to replace."""
    try:
        with files.open_regular(cache, "token cache") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_BYTES)
            if len(head) != HEADER_BYTES or not head.startswith(CACHE_MAGIC):
                return None
            header = json.loads(head[len(CACHE_MAGIC):])
            dtype, count, nvocab = np.dtype(header["dtype"]), int(header["count"]), int(header["vocab_size"])
            if (header["format"] != CACHE_FORMAT or header["encoding"] != encoding or dtype.kind != "u"
                    or dtype != token_dtype(nvocab) or count < 1 or nvocab < 1
                    or size != HEADER_BYTES + count * dtype.itemsize + 4 * nvocab):
                return None
            f.seek(HEADER_BYTES + count * dtype.itemsize)
            vocab = np.frombuffer(f.read(4 * nvocab), "<u4").astype(np.int64)
            if (len(vocab) != nvocab or np.any(np.diff(vocab) <= 0) or vocab[-1] >= SYMBOL_LIMIT[encoding]
                    or not isinstance(header["input_size"], int) or not _is_sha256(header["sha256"])
                    or not (header["stat"] is None or (isinstance(header["stat"], list) and len(header["stat"]) == 5))):
                return None
            ids = np.memmap(f, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))  # the file checked
        return header, ids, [int(s) for s in vocab]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def load_corpus(path, encoding="utf-8", log=print, chunk_bytes=CHUNK_BYTES):
    """The encoded corpus (a Corpus). The token ids are cached next to the input
    (input.txt.<encoding>.tokens: a header page, the ids in the smallest unsigned dtype,
    the vocabulary) and memory-mapped. The cache is used when its recorded stat of the input
    (size, mtime, ctime, inode, device; ctime cannot be set by a user) matches, or else when
    the input's sha256 matches its recorded one; otherwise the input is encoded again."""
    if encoding not in ENCODINGS:
        raise UsageError(f"--encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    cache = os.path.join(os.path.dirname(path) or ".", f"{os.path.basename(path)}.{encoding}.tokens")
    f, st = _open_input(path)
    with f:
        if st.st_size == 0:
            raise UsageError(f"corpus {path} is empty")
        found = _read_cache(cache, encoding)
        if found is not None:
            header, ids, vocab = found
            if header.get("stat") == _stat_key(st):
                return Corpus(ids, vocab, header["sha256"], cache)
            if header.get("input_size") == st.st_size:
                log(f"checking {path} against its token cache (sha256)...", flush=True)
                if _sha256_of(f) == header["sha256"]:
                    corpus = Corpus(ids, vocab, header["sha256"], cache)
                    corpus._new_stat = (header, st)
                    return corpus
                f.seek(0)
            del ids
        return _build(f, st, path, cache, encoding, log, chunk_bytes)


def _trusted_key(st):
    """The stat to record for a cache: None when the input changed too recently for its
    ctime to prove a later change (see RACY_NS)."""
    return _stat_key(st) if st.st_ctime_ns < time.time_ns() - RACY_NS else None


def _refresh_stat(cache, header, st):
    """Record the input's new stat in the header page (best effort: a torn write makes the
    cache unreadable, hence rebuilt)."""
    key = _trusted_key(st)
    if key is None:
        return
    try:
        fd = files.regular_fd(cache, os.O_WRONLY, "token cache")
        try:
            _write_header(fd, dict(header, stat=key))
        finally:
            os.close(fd)
    except (OSError, files.NotRegularFile):
        pass


def _build(f, st, path, cache, encoding, log, chunk_bytes):
    """Encode the corpus into a new cache (files.atomic_write), or into an anonymous temp
    file when the data directory is not writable."""
    header = {"format": CACHE_FORMAT, "encoding": encoding, "input_size": st.st_size,
              "stat": _trusted_key(st)}
    result = {}

    def write(out):
        result["started"] = True
        first_seen, dtype, sha, chunks = _encode(f, st, path, encoding, out.fileno(), log, chunk_bytes)
        if _stat_key(os.fstat(f.fileno())) != _stat_key(st):
            raise UsageError(f"corpus {path} changed while it was being read; run again once it is complete")
        header["sha256"] = sha
        vocab = _finish(out.fileno(), first_seen, dtype, chunks, header)
        result.update(vocab=vocab, dtype=dtype, count=sum(n for _, n, _ in chunks))

    files.remove_stale_temp_files(os.path.dirname(cache) or ".", cache)
    try:
        files.atomic_write(cache, write)
        kept = cache
        ids = np.memmap(cache, dtype=result["dtype"], mode="r", offset=HEADER_BYTES, shape=(result["count"],))
    except OSError as e:
        if result:
            raise UsageError(f"cannot write the token cache {cache} ({e.strerror})") from None
        log(f"cannot write the token cache {cache} ({e.strerror}): encoding into a temporary file, not kept")
        kept = None
        try:
            with tempfile.TemporaryFile() as out:
                write(out)
                ids = np.memmap(out, dtype=result["dtype"], mode="r", offset=HEADER_BYTES, shape=(result["count"],))
        except OSError as e:
            raise UsageError(f"no room for the encoded corpus in a temporary file ({e.strerror})") from None
    return Corpus(ids, [int(s) for s in result["vocab"]], header["sha256"], kept)


# ---------------------------------------------------------------- batches

def split_sizes(nbatches, train_frac, val_frac):
    """char-rnn's split rule: ntrain = floor(nb*train_frac); nval = the rest when there is no
    test split, else floor(nb*val_frac); ntest = what is left."""
    test_frac = max(0.0, 1.0 - (train_frac + val_frac))
    ntrain = int(np.floor(nbatches * train_frac))
    nval = nbatches - ntrain if test_frac == 0 else int(np.floor(nbatches * val_frac))
    return ntrain, nval, nbatches - ntrain - nval


class CharLoader:
    """char-rnn's minibatch loader on a (memory-mapped) array of ids. The corpus, cut to a
    multiple of batch_size*seq_length, is viewed as batch_size contiguous streams; batch k is
    column block k of seq_length; targets are the inputs shifted by one with wrap-around
    (y[-1] = x[0] of the whole cut corpus). Batches are gathered when asked for, time-major
    (T, B) int32, the layout of the kernels; batch(k, s0, s1) gathers only streams [s0, s1)."""

    def __init__(self, ids, batch_size, seq_length, train_frac, val_frac, vocab_size=None):
        per_batch = batch_size * seq_length
        self.nbatches = len(ids) // per_batch
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
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.ids = ids
        self.length = self.nbatches * per_batch
        self.streams = ids[:self.length].reshape(batch_size, self.nbatches, seq_length)  # a view
        self.offset = {"train": 0, "val": self.ntrain, "test": self.ntrain + self.nval}
        self.size = {"train": self.ntrain, "val": self.nval, "test": self.ntest}
        self.position = {split: 0 for split in SPLITS}

    @staticmethod
    def _usable(nbatches, train_frac, val_frac):
        ntrain, nval, _ = split_sizes(nbatches, train_frac, val_frac)
        return ntrain >= 1 and (nval >= 1 or val_frac == 0)

    def batch(self, k, s0=0, s1=None):
        """(x, y) of batch k for streams [s0, s1) (default all), each (seq_length, s1-s0) int32."""
        s1 = self.batch_size if s1 is None else s1
        x = np.ascontiguousarray(self.streams[s0:s1, k, :].T, dtype=np.int32)
        y = np.empty_like(x)
        y[:-1] = x[1:]
        after = (np.arange(s0, s1) * self.nbatches + k + 1) * self.seq_length  # the next id of each stream
        after[after == self.length] = 0  # the last target of the cut corpus wraps to its first id
        y[-1] = self.ids[after]
        # the cache's header and the corpus's stat cannot show ids damaged after the cache was
        # written; such an id would index outside the kernels' arrays. y[:-1] is x[1:].
        if self.vocab_size is not None and max(x.max(), y[-1].max()) >= self.vocab_size:
            raise self._corrupt(k, s0, s1)
        return x, y

    def _corrupt(self, k, s0, s1):
        """The error for batch k (streams [s0, s1)) holding an id >= the vocabulary size: it
        names the first such id, and removes the token cache it came from, so that the next
        run encodes the corpus again."""
        starts = (np.arange(s0, s1) * self.nbatches + k) * self.seq_length
        span = (starts[:, None] + np.arange(self.seq_length + 1)).ravel() % self.length  # x and y's ids
        at = int(span[np.argmax(np.asarray(self.ids[span]) >= self.vocab_size)])
        value = int(self.ids[at])
        what = f"id {value} at position {at} is not below the vocabulary size {self.vocab_size}"
        cache = getattr(self.ids, "filename", None)
        if cache is None:
            return UsageError(f"the encoded corpus is corrupt: {what}; run again")
        return UsageError(f"token cache {cache} is corrupt: {what}; "
                          f"{_remove_corrupt(cache, at, value, self.ids.dtype)}")

    def next_batch(self, split, s0=0, s1=None):
        """(x, y) of the split's next batch, each (seq_length, s1-s0) int32 (streams [s0, s1),
        default all); cycles through the split."""
        k = self.offset[split] + self.position[split]
        self.position[split] = (self.position[split] + 1) % self.size[split]
        return self.batch(k, s0, s1)

    def reset(self, split):
        self.position[split] = 0

    def restore(self, positions):
        """Positions saved by a checkpoint (data_position), checked against this corpus."""
        if not isinstance(positions, dict):
            raise UsageError(f"the checkpoint's data position {positions!r:.80} is not a split -> batch table")
        for split, value in positions.items():
            if split not in SPLITS or not isinstance(value, int) or not 0 <= value < max(self.size[split], 1):
                raise UsageError(f"the checkpoint's data position {split} = {value!r} does not fit this "
                                 f"corpus ({self.size.get(split, 0)} {split} batches)")
            self.position[split] = value


def _remove_corrupt(cache, at, value, dtype):
    """Remove the token cache `cache` if it still holds the bad id `value` at position `at`
    (another run may have replaced it meanwhile). Returns what the user is to do."""
    try:
        with files.open_regular(cache, "token cache") as f:
            f.seek(HEADER_BYTES + at * dtype.itemsize)
            still = f.read(dtype.itemsize) == np.array(value, dtype).tobytes()
        if not still:
            return "it has been replaced since: run again"
        os.unlink(cache)
    except FileNotFoundError:
        return "it has been removed since: run again, it is encoded again"
    except (OSError, files.NotRegularFile) as e:
        return f"delete it and run again, it is encoded again (not removed: {getattr(e, 'strerror', None) or e})"
    return "removed it: the next run encodes the corpus again"
