"""Writing files so that a crash, a kill or a full disk never leaves a half-written one:
every file phi_rnn produces (checkpoints, `latest`, caches, results) goes through
atomic_write."""
import os
import tempfile

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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temp_files(directory):
    """Delete the temporary files that writes killed mid-way (SIGKILL, power loss) left in
    directory. Only safe while no other process writes there (train holds the directory's
    lock). Returns the names removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
    return sorted(removed)
