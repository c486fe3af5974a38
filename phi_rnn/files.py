"""Reading and writing files safely. Every file phi_rnn reads is opened by open_regular: a
FIFO, a device, a directory or a socket where a file should be is refused at once, before
anything is read (a FIFO would block, /dev/zero never end). Every file phi_rnn produces
(checkpoints, `latest`, caches, results) goes through atomic_write, so that a crash, a kill
or a full disk never leaves a half-written one."""
import errno
import fcntl
import os
import stat
import tempfile

from phi_rnn.errors import UsageError

TEMP_PREFIX = ".tmp-"  # atomic_write's temporary files; what a SIGKILL mid-write leaves behind


def _umask():
    # os.umask can only be read by setting it; /proc shows it without that (Linux >= 4.7)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class NotRegularFile(UsageError):
    """A path phi_rnn reads holds a FIFO, a device, a directory or a socket."""


def _kind(mode):
    """What a file of st_mode `mode` is, when it is not a regular file; None when it is."""
    if stat.S_ISREG(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a special file")


def regular_fd(path, flags, what, mode=0o666):
    """os.open(path, flags, mode) of a file that must be a regular file (or a symlink to
    one); anything else is a NotRegularFile naming `what` and path. Opened with O_NONBLOCK,
    so that a FIFO does not wait for a writer (nor a device for its line), and checked by
    fstat of what was opened before anything is read; the descriptor is then blocking
    again. Other failures are open's OSError (FileNotFoundError, PermissionError)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno != errno.ENXIO:  # a socket, a FIFO opened to write with no reader, a device without its driver
            raise
        kind = _kind(os.stat(path).st_mode) or "a special file"
        raise NotRegularFile(f"{what} {path} is {kind}, not a regular file") from None
    try:
        kind = _kind(os.fstat(fd).st_mode)
        if kind:
            raise NotRegularFile(f"{what} {path} is {kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path, what, mode="rb", **kwargs):
    """open(path, mode, **kwargs) for reading a file that must be a regular file: see
    regular_fd. `what` names the file in the error ("checkpoint", "metrics log")."""
    return open(path, mode, opener=lambda name, flags: regular_fd(name, flags, what), **kwargs)


def fsync_directory(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, mode=0o666):
    """Create or replace `path` all at once: write(f) fills a temporary file (binary) in the
    same directory, which is flushed to disk and renamed over path; then the directory entry
    is flushed too. The file gets `mode` less the umask, as open() would give it (mkstemp's
    0600 would hide checkpoints from the user's group on a shared project space). Any
    exception (OSError for a full disk or a read-only place) leaves path as it was and no
    temporary file behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _locked_temp(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # while still locked: no cleaner removes it before it is path
        fsync_directory(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _locked_temp(directory, name):
    """(fd, path) of a new temporary file for atomic_write, locked (flock) for as long as it
    is open: remove_stale_temp_files leaves locked ones alone. One that a cleaner removed
    between its creation and the lock is made again."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix="-" + name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            return fd, tmp  # a filesystem without locks: cleaners cannot lock it either, and leave it
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)


def remove_stale_temp_files(directory, target=None):
    """Delete the temporary files that atomic_write calls killed mid-way (SIGKILL, power
    loss) left in directory: all of them, or only those for the file `target`. A temporary
    file still being written is locked by its writer, so only unlocked ones are removed,
    whoever else writes in the directory (another run encoding the same corpus, a plot or a
    sample written there). Only regular files are opened, never a symlink, without blocking.
    Returns the names removed."""
    suffix = "" if target is None else "-" + os.path.basename(target)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [name for name in names if name.startswith(TEMP_PREFIX) and name.endswith(suffix)
            and _remove_unless_locked(os.path.join(directory, name))]


def _remove_unless_locked(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False  # gone, a symlink, a socket, or not ours to open
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)  # with the lock held: its writer, if it locks it later, makes another
        return True
    except OSError:
        return False  # being written (locked), gone, or not ours to remove
    finally:
        os.close(fd)
