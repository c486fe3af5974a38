"""Running the real CLI in a fresh process (thread settings apply per process)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare", "input.txt")
TINY_MODEL = ["--rnn_size", "16", "--num_layers", "2", "--batch_size", "8", "--seq_length", "16"]


def run_cli(*args, timeout=300, check=False, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **kw.pop("env", {}))
    result = subprocess.run([sys.executable, "-m", "phi_rnn", *map(str, args)], cwd=kw.pop("cwd", ROOT),
                            capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def small_corpus(directory, chars=20000):
    """The first `chars` characters of tiny-shakespeare in directory/input.txt."""
    os.makedirs(directory, exist_ok=True)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read(chars)
    with open(os.path.join(directory, "input.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    return str(directory)


def trained_checkpoint(root, chars, iters):
    """Trains the tiny LSTM for `iters` iterations (validated and saved at the last) on the
    first `chars` characters of tiny-shakespeare, under root. Returns (corpus directory,
    path of the newest checkpoint in root/cv)."""
    corpus = small_corpus(os.path.join(root, "data"), chars)
    cv = os.path.join(root, "cv")
    run_cli("train", "--data_dir", corpus, *TINY_MODEL, "--max_iters", iters, "--eval_val_every", iters,
            "--checkpoint_dir", cv, check=True)
    with open(os.path.join(cv, "latest")) as f:
        return corpus, os.path.join(cv, f.read().strip())


def train_losses(stdout):
    """The train_loss of each printed iteration line."""
    return [float(line.split("train_loss = ")[1].split(",")[0])
            for line in stdout.splitlines() if "train_loss = " in line]


# What can stand where phi_rnn reads a file: a FIFO (open() would wait for a writer), a
# character device (reading /dev/zero never ends) and a directory.
NOT_FILES = {"fifo": "a FIFO", "device": "a device", "directory": "a directory"}


def make_not_a_file(path, kind):
    """Put a FIFO, a symlink to /dev/zero or a directory (NOT_FILES) at path, replacing what
    is there."""
    path = str(path)
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)
    {"fifo": os.mkfifo, "device": lambda p: os.symlink("/dev/zero", p), "directory": os.mkdir}[kind](path)


def snapshot(root):
    """{path: sha256 of a regular file's content, or what else is there} under root, without
    opening anything but regular files."""
    import hashlib
    import stat
    found = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[path] = os.readlink(path) if stat.S_ISLNK(mode) else stat.S_IFMT(mode)
    return found


def one_line_error(result):
    """The one line on stderr of a CLI run refused with exit status 2 (asserted)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("phi_rnn"), lines[0]
    return lines[0]
