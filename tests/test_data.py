"""char-rnn's loader semantics on small texts, against values worked out by hand."""
import os

import numpy as np
import pytest

import reference as R
from phi_rnn import data
from phi_rnn.errors import UsageError


def _corpus(tmp_path, content, name="input.txt"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def test_batches_targets_and_wraparound_by_hand(tmp_path):
    # 26 letters, batch 2, seq 3: cut to 24 -> 4 batches; stream 0 = a..l, stream 1 = m..x
    ids, vocab = data.load_corpus(_corpus(tmp_path, "abcdefghijklmnopqrstuvwxyz"))
    assert vocab == [ord(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    loader = data.CharLoader(ids, batch_size=2, seq_length=3, train_frac=0.5, val_frac=0.5)
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


def test_loader_equals_char_rnn_reference_layout(tmp_path):
    rng = np.random.default_rng(3)
    text = "".join(rng.choice(list("xyz\n é"), 1000))
    ids, vocab = data.load_corpus(_corpus(tmp_path, text))
    loader = data.CharLoader(ids, batch_size=4, seq_length=7, train_frac=0.95, val_frac=0.05)
    xs, ys = R.char_rnn_batches(ids, 4, 7)
    assert loader.nbatches == len(xs) == 1000 // 28
    for k in range(loader.nbatches):
        np.testing.assert_array_equal(loader.x[k], xs[k].T)
        np.testing.assert_array_equal(loader.y[k], ys[k].T)


@pytest.mark.parametrize("nb, train, val, expect", [
    (35, 0.95, 0.05, (33, 2, 0)),   # no test split: val takes the rest
    (100, 0.9, 0.05, (90, 5, 5)),   # test split: floor for val, rest to test
    (10, 0.5, 0.3, (5, 3, 2)),
    (423 + 23, 0.95, 0.05, (423, 23, 0)),  # tiny-shakespeare at 50 x 50
])
def test_split_rule(nb, train, val, expect):
    assert data.split_sizes(nb, train, val) == expect


def test_unicode_code_points_vs_bytes(tmp_path):
    path = _corpus(tmp_path, "héllo wörld")
    ids, vocab = data.load_corpus(path, "utf-8")
    assert len(ids) == 11 and ord("é") in vocab and ord("ö") in vocab
    ids_b, vocab_b = data.load_corpus(path, "bytes")
    assert len(ids_b) == 13 and vocab_b == sorted(set("héllo wörld".encode()))
    symbols = [vocab_b[i] for i in ids_b]
    decode = data.make_decoder("bytes")
    assert decode(symbols[:2]) + decode(symbols[2:]) == "héllo wörld"  # é split across calls


def test_cache_is_used_and_rebuilt_when_input_changes(tmp_path):
    path = _corpus(tmp_path, "abcabc")
    ids, _ = data.load_corpus(path)
    cache = path + ".utf-8.npz"
    assert os.path.isfile(cache)
    stamp = os.stat(cache).st_mtime_ns
    ids2, _ = data.load_corpus(path)
    assert os.stat(cache).st_mtime_ns == stamp and np.array_equal(ids, ids2)
    with open(path, "a") as f:
        f.write("zzz")
    ids3, vocab3 = data.load_corpus(path)
    assert len(ids3) == 9 and vocab3[-1] == ord("z")


def test_too_short_corpus_says_how_short_and_what_fits(tmp_path):
    ids, _ = data.load_corpus(_corpus(tmp_path, "x" * 3000))
    with pytest.raises(UsageError, match=r"3000 characters.*try --seq_length \d+ or --batch_size \d+"):
        data.CharLoader(ids, 50, 50, 0.95, 0.05)


def test_invalid_utf8_names_the_position(tmp_path):
    path = _corpus(tmp_path, b"ok\nfine\n\xff bad")
    with pytest.raises(UsageError, match=r"invalid UTF-8 at byte 8 \(line 3\).*--encoding bytes"):
        data.load_corpus(path)


def test_tinyshakespeare_from_mirror_is_verified(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "tinyshakespeare.txt").write_text("not shakespeare")
    with pytest.raises(UsageError, match="sha256"):
        data.ensure_tinyshakespeare(str(tmp_path / "d"), str(mirror))
    assert not (tmp_path / "d" / "input.txt").exists()
