"""The corpus: char-rnn's loader semantics (by hand and against a plain-numpy reference on
tiny-shakespeare), the streaming encoder against Python's own UTF-8 decoder, and the token
cache (reused, rebuilt when the input changes or the cache is broken, umask respected)."""
import os
import re
import stat
import threading

import numpy as np
import pytest

import reference as R
from cli_helpers import SHAKESPEARE, TINY_MODEL, run_cli, small_corpus, train_losses
from phi_rnn import checkpoint, data
from phi_rnn.errors import UsageError


def _corpus(tmp_path, content, name="input.txt"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def _load(path, encoding="utf-8", **kw):
    """load_corpus, returning also what it logged."""
    lines = []
    corpus = data.load_corpus(path, encoding, log=lambda *a, **k: lines.append(" ".join(map(str, a))), **kw)
    return corpus, lines


def _expected(raw, encoding):
    """(vocab, ids) the plain way: decode it all, np.unique."""
    symbols = (np.frombuffer(raw, np.uint8) if encoding == "bytes" else
               np.frombuffer(raw.decode("utf-8").encode("utf-32-le"), np.uint32))
    vocab, ids = np.unique(symbols, return_inverse=True)
    return [int(s) for s in vocab], ids


def test_batches_targets_and_wraparound_by_hand(tmp_path):
    # 26 letters, batch 2, seq 3: cut to 24 -> 4 batches; stream 0 = a..l, stream 1 = m..x
    corpus, _ = _load(_corpus(tmp_path, "abcdefghijklmnopqrstuvwxyz"))
    assert corpus.vocab == [ord(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    loader = data.CharLoader(corpus.ids, batch_size=2, seq_length=3, train_frac=0.5, val_frac=0.5)
    assert (loader.nbatches, loader.ntrain, loader.nval, loader.ntest) == (4, 2, 2, 0)
    letters = lambda a: ["".join(chr(ord("a") + v) for v in row) for row in a.T]
    x, y = loader.next_batch("train")
    assert letters(x) == ["abc", "mno"] and letters(y) == ["bcd", "nop"]
    x, y = loader.next_batch("train")
    assert letters(x) == ["def", "pqr"] and letters(y) == ["efg", "qrs"]
    x, y = loader.next_batch("train")  # cycles back
    assert letters(x) == ["abc", "mno"]
    x, y = loader.next_batch("val")  # the val split is the tail of every stream
    assert letters(x) == ["ghi", "stu"]
    x, y = loader.next_batch("val")
    # y[-1] wraps around to x[0]: the last target of the cut corpus is its first character
    assert letters(x) == ["jkl", "vwx"] and letters(y) == ["klm", "wxa"]
    x, y = loader.batch(3, 1, 2)  # one stream only
    assert letters(x) == ["vwx"] and letters(y) == ["wxa"]
    x, y = loader.next_batch("train", 0, 1)
    assert letters(x) == ["def"] and letters(y) == ["efg"] and loader.position["train"] == 0


@pytest.mark.parametrize("encoding", ["utf-8", "bytes"])
def test_tinyshakespeare_batches_equal_char_rnn_reference(tmp_path, encoding):
    """Every batch of every split, from the memory-mapped cache, equals char-rnn's loader
    (tests/reference.py) on ids from a plain decode: the old in-memory loader's values."""
    raw = open(SHAKESPEARE, "rb").read()
    corpus, _ = _load(_corpus(tmp_path, raw), encoding)
    vocab, ids = _expected(raw, encoding)
    assert corpus.vocab == vocab and corpus.ids.dtype == np.uint8 and isinstance(corpus.ids, np.memmap)
    np.testing.assert_array_equal(corpus.ids, ids)
    loader = data.CharLoader(corpus.ids, 50, 50, 0.95, 0.05, len(vocab))
    xs, ys = R.char_rnn_batches(ids, 50, 50)
    assert (loader.nbatches, loader.ntrain, loader.nval) == (len(xs), 423, 23) == (446, 423, 23)
    for split in ("train", "val"):
        for k in range(loader.size[split]):
            x, y = loader.next_batch(split)
            ref = loader.offset[split] + k
            assert x.dtype == y.dtype == np.int32 and x.shape == (50, 50) and x.flags.c_contiguous
            np.testing.assert_array_equal(x, xs[ref].T)
            np.testing.assert_array_equal(y, ys[ref].T)
    for k in (0, 445):  # a rank's own streams only (train across nodes)
        x, y = loader.batch(k, 20, 35)
        np.testing.assert_array_equal(x, xs[k].T[:, 20:35])
        np.testing.assert_array_equal(y, ys[k].T[:, 20:35])


def test_training_on_the_map_gives_the_losses_of_reference_batches(tmp_path):
    """The CLI's first iterations equal a loop over char-rnn's reference batches driving
    the same network at the same thread count: the loader feeds training as before."""
    import numba
    from phi_rnn.model import Network
    corpus_dir = small_corpus(tmp_path / "data", 30000)
    threads = numba.get_num_threads()  # conftest's
    result = run_cli("train", "--data_dir", corpus_dir, *TINY_MODEL, "--max_iters", 6, "--threads", threads,
                     "--policy", "none", "--checkpoint_dir", tmp_path / "cv", check=True)
    vocab, ids = _expected(open(os.path.join(corpus_dir, "input.txt"), "rb").read(), "utf-8")
    xs, ys = R.char_rnn_batches(ids, 8, 16)
    net = Network("lstm", len(vocab), 16, 2)
    net.init_params(np.random.default_rng(123))
    state = net.zero_state(8)
    losses = []
    for x, y in zip(xs[:6], ys[:6]):
        x, y = np.ascontiguousarray(x.T, np.int32), np.ascontiguousarray(y.T, np.int32)
        losses.append(net.forward(x, y, state))
        net.backward(x, False)
        net.update(2e-3, 0.95, 5.0)
    assert train_losses(result.stdout) == [float(f"{loss:6.8f}") for loss in losses]


@pytest.mark.parametrize("nb, train, val, expect", [
    (35, 0.95, 0.05, (33, 2, 0)),   # no test split: val takes the rest
    (100, 0.9, 0.05, (90, 5, 5)),   # test split: floor for val, rest to test
    (10, 0.5, 0.3, (5, 3, 2)),
    (423 + 23, 0.95, 0.05, (423, 23, 0)),  # tiny-shakespeare at 50 x 50
])
def test_split_rule(nb, train, val, expect):
    assert data.split_sizes(nb, train, val) == expect


def _mixed_text(rng, n):
    """ASCII, 2-, 3- and 4-byte characters, mostly ASCII as real text."""
    alphabet = list("abc \n") + ["\u00e9", "\u0436", "\u4e2d", "\u20ac", "\U0001f600", "\U00010348"]
    p = np.array([0.2] * 5 + [0.0] * 6)
    p[5:] = 0.5 / 6
    p /= p.sum()
    return "".join(rng.choice(alphabet, n, p=p))


@pytest.mark.parametrize("encoding", ["utf-8", "bytes"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 20])
def test_streaming_encode_equals_a_whole_decode_for_any_chunk_size(tmp_path, encoding, chunk):
    """Characters split across chunks survive; ids are the ranks in the sorted vocabulary
    even when new symbols appear in later chunks."""
    raw = _mixed_text(np.random.default_rng(chunk), 3000).encode()
    corpus, lines = _load(_corpus(tmp_path, raw), encoding, chunk_bytes=chunk)
    vocab, ids = _expected(raw, encoding)
    assert corpus.vocab == vocab
    np.testing.assert_array_equal(corpus.ids, ids)
    assert corpus.ids.dtype == np.uint8
    assert lines[0].startswith("encoding ") and lines[-1].startswith("encoded ")  # not a terminal: log lines


@pytest.mark.parametrize("size, dtype", [(300, np.uint16), (70000, np.uint32)])
def test_vocabulary_outgrowing_its_dtype_late_widens_the_ids(tmp_path, size, dtype):
    """ASCII first (uint8), then hundreds or tens of thousands of other symbols arrive in
    later chunks: the ids written so far are rewritten wider and remapped."""
    rng = np.random.default_rng(size)
    points = [p for p in range(0x100, 0x30000) if not 0xD800 <= p < 0xE000]
    late = "".join(chr(p) for p in rng.permutation(points)[:size])
    raw = ("the ascii start\n" * 400 + late + "end" + late[:50]).encode()
    corpus, _ = _load(_corpus(tmp_path, raw), chunk_bytes=4096)
    vocab, ids = _expected(raw, "utf-8")
    assert corpus.ids.dtype == dtype and corpus.vocab == vocab
    np.testing.assert_array_equal(corpus.ids, ids)
    again, lines = _load(os.path.join(tmp_path, "input.txt"))  # from the cache
    assert again.ids.dtype == dtype and again.vocab == vocab and not any("encoded" in l for l in lines)
    np.testing.assert_array_equal(again.ids, ids)


def test_utf8_validation_matches_pythons_decoder_on_random_bytes(tmp_path):
    """Overlongs, surrogates, code points over U+10FFFF, stray continuation bytes and
    truncated characters: refused at the byte Python's strict decoder names; valid text
    encodes as Python decodes it. Fuzzed, with small chunks so errors straddle chunks."""
    rng = np.random.default_rng(7)
    pieces = [b"a", b"\n", "\u00e9".encode(), "\u4e2d".encode(), "\U0001f600".encode(), b"\xc0\xaf", b"\xe0\x80\xaf",
              b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xff", b"\xe4\xb8", b"\xf0\x9f\x98", b"\xc3"]
    refused = 0
    for trial in range(150):
        raw = b"".join(rng.choice(pieces[:5], rng.integers(1, 40)).tolist())
        if trial % 3:
            cut = int(rng.integers(0, len(raw) + 1))
            raw = raw[:cut] + pieces[int(rng.integers(5, len(pieces)))] + raw[cut:]
        path = _corpus(tmp_path, raw, f"t{trial}.txt")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            refused += 1
            with pytest.raises(UsageError, match=fr"invalid UTF-8 at byte {e.start} \(line {raw[:e.start].count(10) + 1}\)"):
                _load(path, chunk_bytes=int(rng.integers(1, 8)))
            assert not [n for n in os.listdir(tmp_path) if n.startswith(f".t{trial}.txt")]  # no temp left
            continue
        corpus, _ = _load(path, chunk_bytes=int(rng.integers(1, 8)))
        vocab, ids = _expected(raw, "utf-8")
        assert corpus.vocab == vocab and np.array_equal(corpus.ids, ids)
    assert 60 < refused < 110


def test_cache_is_reused_and_rebuilt_when_the_input_changes_even_with_size_and_mtime_restored(tmp_path):
    path = _corpus(tmp_path, "abcabc" * 100)
    first, lines = _load(path)
    cache = path + ".utf-8.tokens"
    assert os.path.isfile(cache) and first.cache == cache and any("encoded" in l for l in lines)
    before = os.stat(path)
    again, lines = _load(path)
    assert not any("encoded" in l for l in lines) and np.array_equal(first.ids, again.ids)
    assert again.sha256 == first.sha256
    # same size, mtime put back: the stat differs only in ctime, the content hash decides
    _corpus(tmp_path, "abcabd" * 100)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns and os.stat(path).st_size == before.st_size
    changed, lines = _load(path)
    assert any("encoded" in l for l in lines)
    assert changed.vocab == [ord(c) for c in "abcd"] and changed.sha256 != first.sha256


def test_cache_trusts_the_stat_and_verifies_a_moved_corpus_by_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "RACY_NS", 0)  # the test's files are seconds old
    path = _corpus(tmp_path, "hello world\n" * 100)
    first, _ = _load(path)
    _, lines = _load(path)
    assert lines == []  # stat matches: no hashing, no encoding
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("input.txt", "input.txt.utf-8.tokens"):
        os.rename(tmp_path / name, moved / name)  # new ctime: verified by hash, then trusted again
        os.utime(moved / name)
    again, lines = _load(str(moved / "input.txt"))
    assert len(lines) == 1 and "against its token cache" in lines[0] and again.sha256 == first.sha256
    cache = open(moved / "input.txt.utf-8.tokens", "rb").read()
    _, lines = _load(str(moved / "input.txt"))  # a run refused later leaves the cache as it was
    assert len(lines) == 1 and open(moved / "input.txt.utf-8.tokens", "rb").read() == cache
    again.keep_stat()  # a run under way records the stat
    _, lines = _load(str(moved / "input.txt"))
    assert lines == []


@pytest.mark.parametrize("damage", ["zero bytes", "truncated", "garbage", "bad header", "longer", "header only",
                                    "unsorted vocab"])
def test_broken_cache_is_rebuilt_without_a_traceback(tmp_path, damage):
    path = _corpus(tmp_path, "the quick brown fox\n" * 50)
    good, _ = _load(path)
    cache = good.cache
    content = open(cache, "rb").read()
    del good
    broken = {"zero bytes": b"", "truncated": content[:len(content) - 3], "garbage": os.urandom(len(content)),
              "bad header": content[:30] + b"{" + content[31:], "longer": content + b"\0",
              "header only": content[:data.HEADER_BYTES],
              "unsorted vocab": content[:-8] + content[-4:] + content[-8:-4]}[damage]
    open(cache, "wb").write(broken)
    corpus, lines = _load(path)
    assert any("encoded" in l for l in lines)
    assert open(cache, "rb").read() == content
    vocab, ids = _expected(open(path, "rb").read(), "utf-8")
    assert corpus.vocab == vocab and np.array_equal(corpus.ids, ids)


@pytest.mark.parametrize("position", [1, 159, 160])  # in x; the wrapped-around target y[-1] of stream 0; stream 1
def test_a_corrupt_id_in_the_map_is_one_clear_error_and_the_cache_is_encoded_again(tmp_path, position):
    """Ids damaged after the cache was written (its header and the corpus's stat intact):
    the batch that holds one is refused before it reaches the kernels, naming the id, and
    the cache is removed, so that the next load encodes the corpus again."""
    path = _corpus(tmp_path, "abcdefgh" * 40)  # 320 ids, batch 2 x 4: 40 batches, streams of 160
    corpus, _ = _load(path)
    with open(corpus.cache, "r+b") as f:
        f.seek(data.HEADER_BYTES + position)
        f.write(b"\x63")
    corpus, lines = _load(path)
    assert not any("encoded" in line for line in lines)  # its header and the corpus match: it is used
    loader = data.CharLoader(corpus.ids, 2, 4, 0.5, 0.5, len(corpus.vocab))
    batch = 39 if position == 159 else position % 160 // 4  # the batch whose x, or y[-1], holds it
    with pytest.raises(UsageError, match=rf"token cache \S*input.txt.utf-8.tokens is corrupt: id 99 at position "
                                         rf"{position} is not below the vocabulary size 8; removed it: the next "
                                         rf"run encodes the corpus again"):
        loader.batch(batch)
    assert not os.path.exists(corpus.cache)
    corpus, lines = _load(path)
    assert any("encoded" in line for line in lines)
    assert corpus.ids.max() == 7 and np.array_equal(corpus.ids, _expected(open(path, "rb").read(), "utf-8")[1])


def test_a_corrupt_id_stops_training_or_validation_with_one_line_and_the_next_run_is_clean(tmp_path):
    corpus_dir = small_corpus(tmp_path / "data", 20000)
    text = open(os.path.join(corpus_dir, "input.txt"), "rb").read()
    train = ["train", "--data_dir", corpus_dir, *TINY_MODEL, "--max_iters", 6, "--eval_val_every", 3]
    run_cli(*train, "--checkpoint_dir", tmp_path / "first", check=True)
    cache = os.path.join(corpus_dir, "input.txt.utf-8.tokens")
    # batch_size 8 x seq_length 16: 156 batches, of which 148 train and 8 validate; stream 0
    # holds batch k's ids from k * 16: damage one in batch 150 (validated at iteration 3),
    # then one in batch 2 (trained on at iteration 3)
    for batch, stopped in ((150, "validation"), (2, "training")):
        with open(cache, "r+b") as f:
            f.seek(data.HEADER_BYTES + batch * 16 + 5)
            f.write(b"\xff")
        result = run_cli(*train, "--checkpoint_dir", tmp_path / stopped)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert re.fullmatch(rf"phi_rnn: error: token cache \S*input.txt.utf-8.tokens is corrupt: id 255 at position "
                            rf"{batch * 16 + 5} is not below the vocabulary size \d+; removed it: the next run "
                            rf"encodes the corpus again", lines[0]), lines[0]
        assert os.listdir(corpus_dir) == ["input.txt"]
        assert open(os.path.join(corpus_dir, "input.txt"), "rb").read() == text
        clean = run_cli(*train, "--checkpoint_dir", tmp_path / f"{stopped}-again", check=True)
        assert "encoded" in clean.stdout and os.path.exists(cache)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cache_permissions_follow_the_umask(tmp_path, umask):
    path = _corpus(tmp_path, "permissions\n" * 20)
    old = os.umask(umask)
    try:
        corpus, _ = _load(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(corpus.cache).st_mode) == 0o666 & ~umask


def test_unwritable_data_directory_encodes_into_a_temporary_file(tmp_path):
    import subprocess
    path = _corpus(tmp_path, "read only\n" * 30)
    if os.geteuid() == 0:  # root writes into mode 0555 directories: make it immutable instead
        made = subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True).returncode == 0
        undo = ["chattr", "-i", str(tmp_path)]
    else:
        os.chmod(tmp_path, 0o555)
        made, undo = True, ["chmod", "755", str(tmp_path)]
    if not made:
        pytest.skip("cannot make a directory unwritable for root here (chattr +i)")
    try:
        corpus, lines = _load(path)
    finally:
        subprocess.run(undo, check=True)
    assert corpus.cache is None and any("cannot write the token cache" in l for l in lines)
    assert os.listdir(tmp_path) == ["input.txt"]
    vocab, ids = _expected(b"read only\n" * 30, "utf-8")
    assert corpus.vocab == vocab and np.array_equal(corpus.ids, ids)


def test_stale_temp_files_of_killed_runs_are_removed_and_others_kept(tmp_path):
    import fcntl
    path = _corpus(tmp_path, "stale\n" * 30)
    temps = {kind: tmp_path / f".tmp-{kind}-input.txt.utf-8.tokens" for kind in ("stale", "locked", "other")}
    temps["other"] = tmp_path / ".tmp-other-model.onnx"  # another file's, written by another command
    for temp in temps.values():
        temp.write_bytes(b"half an encode")
    os.mkfifo(tmp_path / ".tmp-fifo-input.txt.utf-8.tokens")  # never opened (it would block)
    with open(temps["locked"], "rb") as held:  # another run encoding the same corpus right now
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        loading = threading.Thread(target=_load, args=(path,), daemon=True)
        loading.start()
        loading.join(60)
        assert not loading.is_alive(), "blocked"
    assert not temps["stale"].exists() and temps["locked"].exists() and temps["other"].exists()
    assert stat.S_ISFIFO(os.lstat(tmp_path / ".tmp-fifo-input.txt.utf-8.tokens").st_mode)


def test_a_full_disk_while_encoding_is_one_line_and_leaves_nothing(tmp_path):
    import resource
    import signal
    corpus_dir = small_corpus(tmp_path / "data", 300000)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))

    result = run_cli("train", "--data_dir", corpus_dir, *TINY_MODEL, "--max_iters", 2, "--checkpoint_dir",
                     tmp_path / "cv", preexec_fn=limit_file_size)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "cannot write the token cache" in lines[0] and "input.txt.utf-8.tokens" in lines[0]
    assert os.listdir(corpus_dir) == ["input.txt"]


def test_corpus_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    devzero = tmp_path / "zero"
    devzero.mkdir()
    os.symlink("/dev/zero", devzero / "input.txt")
    with pytest.raises(UsageError, match=r"input.txt is a device, not a regular file"):
        _load(str(devzero / "input.txt"))
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "input.txt")
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_raises(lambda: _load(str(fifo / "input.txt")))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert outcome and "input.txt is a FIFO, not a regular file" in outcome[0]  # no hang in open()
    os.symlink(SHAKESPEARE, tmp_path / "link.txt")  # a symlink to a regular file is fine
    corpus, _ = _load(str(tmp_path / "link.txt"))
    assert len(corpus.vocab) == 65


def _raises(fn):
    try:
        fn()
    except UsageError as e:
        return str(e)
    return "no error"


def test_too_short_corpus_says_how_short_and_what_fits(tmp_path):
    corpus, _ = _load(_corpus(tmp_path, "x" * 3000))
    with pytest.raises(UsageError, match=r"3000 characters.*try --seq_length \d+ or --batch_size \d+"):
        data.CharLoader(corpus.ids, 50, 50, 0.95, 0.05)


def test_invalid_utf8_names_the_position(tmp_path):
    path = _corpus(tmp_path, b"ok\nfine\n\xff bad")
    with pytest.raises(UsageError, match=r"invalid UTF-8 at byte 8 \(line 3\).*--encoding bytes"):
        _load(path)
    assert sorted(os.listdir(tmp_path)) == ["input.txt"]


def test_restored_data_position_is_checked(tmp_path):
    corpus, _ = _load(_corpus(tmp_path, "abcdefghijklmnopqrstuvwxyz"))
    loader = data.CharLoader(corpus.ids, 2, 3, 0.5, 0.5)
    loader.restore({"train": 1, "val": 0, "test": 0})
    assert loader.position["train"] == 1
    for bad in ({"train": 2}, {"val": -1}, {"train": 1.0}, {"nope": 0}, [1, 2], "train"):
        with pytest.raises(UsageError, match="data position"):
            loader.restore(bad)


def test_tinyshakespeare_from_mirror_is_verified(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(UsageError, match="sha256"):
        data.ensure_tinyshakespeare(str(tmp_path / "d"), str(mirror))
    assert not (tmp_path / "d" / "input.txt").exists() and os.listdir(tmp_path / "d") == []


# ---------------------------------------------------------------- through the CLI

def test_resume_on_another_corpus_is_refused_and_init_from_allowed(tmp_path):
    corpus_dir = small_corpus(tmp_path / "data", 20000)
    cv = tmp_path / "cv"
    run_cli("train", "--data_dir", corpus_dir, *TINY_MODEL, "--max_iters", 3, "--checkpoint_dir", cv, check=True)
    ck = checkpoint.load("latest", str(cv))
    assert ck.meta["corpus_sha256"] == data._sha256_of(open(os.path.join(corpus_dir, "input.txt"), "rb"))
    other = tmp_path / "other"
    other.mkdir()
    text = open(os.path.join(corpus_dir, "input.txt"), encoding="utf-8").read()
    (other / "input.txt").write_text(text[::-1], encoding="utf-8")  # same vocabulary, same length
    result = run_cli("train", "--data_dir", other, *TINY_MODEL, "--max_iters", 6, "--checkpoint_dir", cv,
                     "--resume", "latest")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "was trained on another corpus" in lines[0] and "--init_from starts a new run" in lines[0]
    result = run_cli("train", "--data_dir", other, *TINY_MODEL, "--max_iters", 2, "--checkpoint_dir",
                     tmp_path / "cv2", "--init_from", ck.path, check=True)
    assert "initializing from" in result.stdout
    import json
    with np.load(ck.path) as z:
        arrays = {k: z[k] for k in z.files}
    for bad in (12345, "not hex", "A" * 64):
        meta = dict(json.loads(str(arrays["meta"])), corpus_sha256=bad)
        np.savez(tmp_path / "bad.npz", **dict(arrays, meta=np.array(json.dumps(meta))))
        with pytest.raises(UsageError, match="has a corrupt corpus_sha256"):
            checkpoint.load(str(tmp_path / "bad.npz"))


def test_evaluation_is_timed_limited_by_val_max_batches_and_a_slow_one_is_named_once(tmp_path):
    corpus_dir = small_corpus(tmp_path / "data", 60000)  # 60000 // 128 = 468 batches: 24 val
    common = ["train", "--data_dir", corpus_dir, *TINY_MODEL, "--max_iters", 4, "--eval_val_every", 2,
              "--threads", 1]
    full = run_cli(*common, "--checkpoint_dir", tmp_path / "a", check=True)
    evals = [l for l in full.stdout.splitlines() if l.startswith("validation loss")]
    assert len(evals) == 2 and all("(24 batches in " in l for l in evals)
    notes = [l for l in full.stdout.splitlines() if "--val_max_batches" in l]
    assert len(notes) == 1 and notes[0].startswith("note: this evaluation took longer")  # 24 > 2 iterations
    short = run_cli(*common, "--val_max_batches", 3, "--checkpoint_dir", tmp_path / "b", check=True)
    evals_short = [l for l in short.stdout.splitlines() if l.startswith("validation loss")]
    assert all("(3 batches in " in l for l in evals_short)
    # the first 3 batches, the same each time: the reference's mean over them
    ck = checkpoint.load("latest", str(tmp_path / "b"))
    raw = open(os.path.join(corpus_dir, "input.txt"), "rb").read()
    vocab, ids = _expected(raw, "utf-8")
    xs, ys = R.char_rnn_batches(ids, 8, 16)
    params = {k: v.astype(np.float64) for k, v in ck.params.items()}
    state, losses = np.zeros((2, 2, 8, 16)), []
    for x, y in zip(xs[444:447], ys[444:447]):
        loss, _, state = R.forward("lstm", params, x.T, y.T, state, 2)
        losses.append(loss)
    assert abs(np.mean(losses) - ck.meta["val_losses"]["4"]) < 1e-4
    bad = run_cli(*common, "--val_max_batches", 0, "--checkpoint_dir", tmp_path / "c")
    assert bad.returncode == 2 and "--val_max_batches must be positive, got 0" in bad.stderr
