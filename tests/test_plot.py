"""`plot`: the loss curves of real training runs' metrics logs in one PNG, and bad input as
one line with exit status 2."""
import os
import re
import sys

import numpy as np
import pytest

from cli_helpers import NOT_FILES, TINY_MODEL, make_not_a_file, one_line_error, run_cli, small_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs at different learning rates, each in its own checkpoint directory."""
    root = tmp_path_factory.mktemp("plot")
    corpus = small_corpus(root / "data", 20000)
    dirs = []
    for name, rate in (("slow", 0.002), ("fast", 0.01)):
        run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--learning_rate", rate, "--max_iters", 60,
                "--eval_val_every", 10, "--checkpoint_dir", root / name, check=True)
        dirs.append(root / name)
    return dirs


def _has_color(image, color, min_pixels=200):
    from matplotlib.colors import to_rgb
    rgb = np.array(to_rgb(color))
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum()) >= min_pixels


def test_two_runs_overlaid_in_one_png(runs, tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'phi_rnn[plots]')")
    from matplotlib import image

    out = tmp_path / "loss.png"
    result = run_cli("plot", *runs, "-o", out, check=True)
    assert "slow/lstm" in result.stdout and "fast/lstm" in result.stdout
    picture = image.imread(out)
    assert picture.shape[0] > 400 and picture.shape[1] > 800
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    assert _has_color(picture, colors[0]) and _has_color(picture, colors[1])  # each run drawn
    assert not _has_color(picture, colors[2])


def test_bad_input_is_one_line_exit_2(runs, tmp_path):
    def bad(*argv, code=None):
        if code:
            import subprocess
            result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        else:
            result = run_cli("plot", *argv)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        return lines[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "x.metrics.csv"
    garbage.write_bytes(b"\xff\xfe not a log\n")
    assert "no metrics log (*.metrics.csv) in" in bad(empty)
    assert "does not exist" in bad(tmp_path / "missing")
    assert "cannot read" in bad(garbage)
    assert "cannot write" in bad(runs[0], "-o", tmp_path / "no" / "loss.png")
    assert "is a directory" in bad(runs[0], "-o", tmp_path)
    assert "plot needs matplotlib" in bad(code=f"import sys; sys.modules['matplotlib'] = None; "
                                               f"from phi_rnn.cli import main; sys.exit(main(['plot', {str(runs[0])!r}]))")


@pytest.mark.parametrize("kind", sorted(NOT_FILES))
def test_a_log_that_is_not_a_file_is_one_line_exit_2_at_once(tmp_path, kind):
    """A FIFO (which would block open()), /dev/zero (whose reading never ends) or a directory
    named as a metrics log, found in a run's directory or given: refused before anything is
    read. A hang fails by the timeout."""
    run = tmp_path / "run"
    run.mkdir()
    make_not_a_file(run / "lstm.metrics.csv", kind)
    given = [run] + ([run / "lstm.metrics.csv"] if kind != "directory" else [])  # a directory given is a run's
    for path in given:
        line = one_line_error(run_cli("plot", path, "-o", tmp_path / "loss.png", timeout=120))
        assert re.search(rf"metrics log \S*run/lstm.metrics.csv is {NOT_FILES[kind]}, not a regular file", line), line
    assert os.listdir(tmp_path) == ["run"] and os.listdir(run) == ["lstm.metrics.csv"]
