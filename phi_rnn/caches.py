"""Where phi_rnn keeps what it works out once per user and machine: numba's compiled kernels
and the measured GEMM backend (gemm_choice.py). An install may be read-only to its users (a
shared venv, conda env or module) and a user's home may be read-only or over quota: no cache
that cannot be written stops a command.

A directory is usable when this process can create it (if need be) and write a file in it.

- The user cache: $XDG_CACHE_HOME/phi_rnn (~/.cache/phi_rnn without XDG_CACHE_HOME) when
  usable; else $TMPDIR/phi_rnn-<uid> (Python's temporary directory: $TMPDIR, else /tmp, ...),
  a directory of this user's alone: created with mode 0700; one that is there must be this
  user's own directory (not a link), and is set to 0700; another user's is refused.
- The kernels: where NUMBA_CACHE_DIR names, when the user set it; else beside phi_rnn's
  sources (phi_rnn/__pycache__, numba's default) when that is usable (a checkout, a user's
  own environment); else <user cache>/numba; else, with no user cache, a private temporary
  directory removed at exit (the kernels are compiled on every run).
- The GEMM backend: <user cache>/gemm_backend.json; with no user cache it is measured and
  used, not kept.
- matplotlib's font cache (plot): its own directory when writable, else <user cache>/matplotlib.

Without a user cache phi_rnn says so in one line on stderr. Imports nothing heavy:
phi_rnn/__init__.py sets the kernels' directory before numba can be imported, since numba
reads NUMBA_CACHE_DIR once, when it is imported.
"""
import atexit
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
NUMBA_CACHE_ENV = "NUMBA_CACHE_DIR"
_PROBE_BYTES = 4096  # a block: a full quota refuses it, where an empty file would still be made

_not_kept_said = False


def _usable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(bytes(_PROBE_BYTES))
            probe.flush()
        return True
    except OSError:
        return False


def xdg_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "phi_rnn"


def private_temp_dir():
    """$TMPDIR/phi_rnn-<uid> (see the module docstring), or None where there is no
    temporary directory."""
    try:
        return Path(tempfile.gettempdir()) / f"phi_rnn-{os.getuid()}"
    except OSError:  # no writable temporary directory at all
        return None


def _own_private_dir(path):
    """Whether `path` is (made) a directory of this user's alone: another user could read or
    replace what is kept in a shared or foreign one."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(path, 0o700)
        return True
    except OSError:
        return False


def user_cache_dir():
    """The user cache (module docstring), or None when neither place is usable."""
    xdg = xdg_cache_dir()
    if _usable(xdg):
        return xdg
    private = private_temp_dir()
    if private is not None and _own_private_dir(private) and _usable(private):
        return private
    return None


def say_not_kept(what):
    """One line on stderr, once per process: no user cache, so `what` (a clause)."""
    global _not_kept_said
    if _not_kept_said:
        return
    _not_kept_said = True
    print(f"phi_rnn: warning: no writable cache directory ({xdg_cache_dir()}, then "
          f"{private_temp_dir() or 'a temporary directory'} of this user's alone): {what}",
          file=sys.stderr, flush=True)


def configure_kernel_cache():
    """Point numba at a writable directory for the kernels (module docstring) unless the user
    named one or numba's default beside the sources is writable. Before numba is imported."""
    if os.environ.get(NUMBA_CACHE_ENV) or _usable(PACKAGE_DIR / "__pycache__"):
        return
    base = user_cache_dir()
    if base is not None:
        _use_kernel_dir(base / "numba")
        return
    scratch = _scratch_dir("phi_rnn-kernels-")
    if scratch is None:
        return  # nowhere to write at all: numba says so when it compiles
    _use_kernel_dir(scratch)
    say_not_kept("kernels are compiled and the GEMM backend measured for this run only")


def configure_matplotlib():
    """Give matplotlib a writable directory for its font cache (MPLCONFIGDIR) where its own
    ($XDG_CONFIG_HOME/matplotlib, ~/.config/matplotlib) cannot be written: <user cache>/matplotlib,
    else a scratch directory removed at exit (matplotlib would make one itself, in two lines
    of warning). Before matplotlib is imported; a user's MPLCONFIGDIR is left as it is."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    if os.environ.get("MPLCONFIGDIR") or _usable(Path(config) / "matplotlib"):
        return
    base = user_cache_dir()
    chosen = base / "matplotlib" if base is not None else _scratch_dir("phi_rnn-matplotlib-")
    if chosen is not None:
        os.environ["MPLCONFIGDIR"] = str(chosen)


def _scratch_dir(prefix):
    """A private temporary directory removed at exit, or None where none can be made."""
    try:
        scratch = tempfile.mkdtemp(prefix=prefix)
    except OSError:
        return None
    atexit.register(shutil.rmtree, scratch, True)
    return scratch


def _use_kernel_dir(path):
    os.environ[NUMBA_CACHE_ENV] = str(path)
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba imported before phi_rnn: it read the variable already
        config.CACHE_DIR = str(path)
