"""A shared, read-only install: an administrator installs phi_rnn once (a venv, a conda env, a
module) and users who cannot write to it run it, from a home they cannot write to either (a
read-only mount, a full quota). Every command still works: numba's compiled kernels and the
measured GEMM backend go to a private directory of the user's under $TMPDIR (phi_rnn/caches.py),
or are kept for the run only, said in one line; nothing crashes, no file already there changes.

The package is copied into a directory nobody may write to and run from there with HOME
pointing at a directory the user cannot write to. Root writes anywhere, so as root the
commands run without the capabilities that override file permissions (setpriv): root then
meets the same permission bits as any user (and still runs the interpreter, which may sit
where another uid cannot reach it)."""
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cli_helpers import ROOT, small_corpus

AS_ROOT = os.geteuid() == 0
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] if AS_ROOT else []
ANOTHER_USER = 65534  # nobody


def _read_only(tree):
    for directory, _, names in os.walk(tree):
        for name in names:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)


def _snapshot(*trees):
    """{path: sha256} of each file among `trees` and every file under the directories among
    them (the files that must not change)."""
    found = {}
    for tree in trees:
        if os.path.isfile(tree):
            with open(tree, "rb") as f:
                found[str(tree)] = hashlib.sha256(f.read()).hexdigest()
        for directory, _, names in os.walk(tree):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


class SharedInstall:
    """The copy of phi_rnn nobody may write to, an unwritable HOME, a sticky $TMPDIR as /tmp
    is, and a work directory of the user's (corpus, checkpoints, outputs)."""

    def __init__(self, base):
        self.base = base
        self.install, self.home, self.temp, self.work = (base / name for name in ("install", "home", "tmp", "work"))
        shutil.copytree(Path(ROOT) / "phi_rnn", self.install / "phi_rnn",
                        ignore=shutil.ignore_patterns("__pycache__"))
        _read_only(self.install)
        self.home.mkdir(0o555)
        os.chmod(self.home, 0o555)
        self.temp.mkdir()
        os.chmod(self.temp, 0o1777)
        self.work.mkdir()
        self.corpus = small_corpus(self.work / "data", 6000)
        self.corpus_file = self.work / "data" / "input.txt"

    def run(self, *args, temp=None, **env):
        """`python -m phi_rnn args` from the read-only copy, without root's overrides."""
        clean = {k: v for k, v in os.environ.items()
                 if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR")}
        clean.update(HOME=str(self.home), TMPDIR=str(temp or self.temp), PYTHONPATH=str(self.install),
                     PYTHONUNBUFFERED="1", **env)
        return subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "phi_rnn", *map(str, args)], cwd=self.work,
                              env=clean, capture_output=True, text=True, timeout=900)

    def private_dir(self, temp=None):
        return (temp or self.temp) / f"phi_rnn-{os.getuid()}"


@pytest.fixture(scope="module")
def shared():
    if AS_ROOT and shutil.which("setpriv") is None:
        pytest.skip("root writes into read-only directories, and setpriv (util-linux) is not here to stop it")
    base = Path(tempfile.mkdtemp(prefix="phi_rnn-shared-install-"))
    try:
        yield SharedInstall(base)
    finally:
        for directory, names, _ in os.walk(base):
            for name in names:
                os.chmod(os.path.join(directory, name), 0o755)
        shutil.rmtree(base)


def _clean(result):
    """No traceback, whatever the status."""
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def trained(shared):
    """The four commands in turn (one compile of the kernels, kept for the later ones):
    {command: result}, with the files that were there before unchanged."""
    before = _snapshot(shared.install, shared.home, shared.corpus_file)
    results = {"train": shared.run("train", "--data_dir", shared.corpus, "--rnn_size", "16", "--num_layers", "1",
                                   "--batch_size", "4", "--seq_length", "8", "--max_iters", "4",
                                   "--eval_val_every", "4", "--checkpoint_dir", shared.work / "cv", "--threads", "1")}
    checkpoint = shared.work / "cv" / (shared.work / "cv" / "latest").read_text().strip() \
        if (shared.work / "cv" / "latest").exists() else shared.work / "cv" / "missing.npz"
    results["sample"] = shared.run("sample", checkpoint, "--length", "40", "--threads", "1")
    results["export"] = shared.run("export", checkpoint, "--to", "onnx", shared.work / "model.onnx")
    results["plot"] = shared.run("plot", shared.work / "cv", "-o", shared.work / "loss.png")
    assert _snapshot(shared.install, shared.home, shared.corpus_file) == before
    return results


@pytest.mark.parametrize("command", ["train", "sample", "export", "plot"])
def test_every_command_runs_from_a_read_only_install_with_an_unwritable_home(trained, shared, command):
    result = _clean(trained[command])
    assert result.returncode == 0 and result.stderr == "", result.stderr  # not a word about caches
    produced = {"sample": lambda: len(result.stdout) >= 40, "export": (shared.work / "model.onnx").exists,
                "plot": (shared.work / "loss.png").exists, "train": (shared.work / "cv" / "latest").exists}
    assert produced[command]()


def test_the_kernels_and_the_gemm_choice_are_kept_in_a_private_directory_under_tmpdir(trained, shared):
    private = shared.private_dir()
    info = os.lstat(private)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    assert (private / "gemm_backend.json").exists()
    assert any(name.endswith(".nbi") for _, _, names in os.walk(private / "numba") for name in names)
    assert "kernels ready" in trained["train"].stdout and "(from cache)" not in trained["train"].stdout


def test_another_users_directory_in_tmpdir_is_refused_and_nothing_is_kept_said_in_one_line(shared):
    """$TMPDIR/phi_rnn-<uid> that is not the user's own (another user's, writable by all; a
    link where this user cannot make another's): nothing is read from it or written to it;
    the kernels compile into a scratch directory removed at exit."""
    temp = shared.base / "tmp-foreign"
    temp.mkdir()
    os.chmod(temp, 0o1777)
    planted = shared.private_dir(temp)
    before = sorted(os.listdir(shared.work))
    if AS_ROOT:
        planted.mkdir()
        os.chmod(planted, 0o777)
        os.chown(planted, ANOTHER_USER, ANOTHER_USER)
        before = []
    else:
        planted.symlink_to(shared.work)
    result = _clean(shared.run("export", shared.work / "cv" / "missing.npz", "--to", "onnx",
                               shared.work / "none.onnx", temp=temp))
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("phi_rnn: warning: no writable cache directory"), result.stderr
    assert lines[0].endswith("kernels are compiled and the GEMM backend measured for this run only")
    assert lines[1].startswith("phi_rnn: error: ") and result.returncode == 2  # the checkpoint is missing
    assert os.listdir(temp) == [planted.name] and sorted(os.listdir(planted)) == before  # the link leads to work/


def test_a_numba_cache_dir_the_user_set_is_where_the_kernels_go(shared):
    (shared.base / "mine").mkdir()
    result = _clean(shared.run("export", shared.work / "cv" / "missing.npz", "--to", "onnx",
                               shared.work / "none.onnx", NUMBA_CACHE_DIR=str(shared.base / "mine")))
    assert result.returncode == 2 and result.stderr.startswith("phi_rnn: error: "), result.stderr
    assert any(name.endswith(".nbi") for _, _, names in os.walk(shared.base / "mine") for name in names)
