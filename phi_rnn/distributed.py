"""Data-parallel training over MPI (mpi4py): the one layer that knows about ranks.

char-rnn's global batch of B streams is split into contiguous ranges, one per rank (each rank
splits its range over its threads as a single process does). Every rank runs the same
forward and backward on its streams, then ONE allreduce sums the flat gradient buffer; the
values every rank must agree on ride along in the buffer's spare slots after the gradient:
the loss (as a float32 pair, so its sum keeps double precision) and one count per stop
signal (so a walltime SIGTERM that reaches the ranks at slightly different moments stops
them all at the same iteration). The update is then the same on every rank.

connect() returns a `Single` (one process: every call is a no-op returning its input, and
mpi4py is never imported) unless the process was started by an MPI launcher, then an
`MpiWorld`. Started by a launcher with more than one rank and no mpi4py: one-line error.
"""
import os
import socket
import sys
import time

from phi_rnn.errors import UsageError

MPI_HINT = "pip install 'phi_rnn[mpi]' (mpi4py + the mpich wheel) or mpi4py built against the site's MPI"
# launcher variables: (size variable, rank variable); PMI_* MPICH/Intel MPI (Hydra) and Slurm's PMI2,
# OMPI_* Open MPI, MV2_* MVAPICH; PMIx launchers set PMIX_RANK only (size known after MPI_Init)
LAUNCHER_VARIABLES = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                      ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"), (None, "PMIX_RANK"))
CARRIED = 2  # spare slots: the loss as a float32 (high, low) pair
PAIR_BITS = 10
FINISH_TIMEOUT_S = 20  # how long a rank that stops waits for the others before aborting the job
ABORT_GRACE_S = 1.0  # how long a rank's last error line has to reach the launcher before the abort


def launched_size(env=os.environ):
    """Ranks in the job if an MPI launcher started this process (0: size unknown yet), else None."""
    for size_name, rank_name in LAUNCHER_VARIABLES:
        if size_name and env.get(size_name, "").isdigit():
            return int(env[size_name])
        if rank_name in env:
            return 0
    return None


def launched_rank(env=os.environ):
    """This process's rank from the launcher's variables (0 when not launched by MPI): known
    before MPI starts, so that only rank 0 reports errors found that early."""
    for _, rank_name in LAUNCHER_VARIABLES:
        if env.get(rank_name, "").isdigit():
            return int(env[rank_name])
    return 0


def connect(env=os.environ):
    """The world this process trains in: `Single` without an MPI launcher (mpi4py is not even
    imported), else an `MpiWorld` over MPI_COMM_WORLD."""
    size = launched_size(env)
    if size is None or size == 1:
        return Single()
    try:
        import mpi4py
    except ImportError:
        raise UsageError(f"started as {size or 'several'} MPI ranks, but mpi4py is not installed: "
                         f"{MPI_HINT}") from None
    # OpenMP threads never call MPI: only the main thread does
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() == 1:
        return Single()
    return MpiWorld(MPI)


def stream_range(batch_size, rank, size):
    """Rank `rank`'s contiguous range [start, stop) of the global batch's streams: the same
    split as the batch strategy's over threads (block p = rows p*B//P .. (p+1)*B//P)."""
    if batch_size < size:
        raise UsageError(f"--batch_size {batch_size} is smaller than the {size} MPI ranks: every "
                         f"rank needs at least one stream")
    return rank * batch_size // size, (rank + 1) * batch_size // size


def library_version(text):
    """MPI_Get_library_version's text -> 'MPICH 5.0.2', 'Open MPI v4.1.6', 'Intel(R) MPI Library 2021.13 ...'."""
    first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "unknown MPI"
    if first.startswith("MPICH Version:"):
        return "MPICH " + first.split(":", 1)[1].strip()
    return first.split(",")[0]


def _split_pair(value):
    """A float as float32 (high, low): high on a grid of 2**-PAIR_BITS, so that the ranks' highs
    sum exactly in float32 (for values below 2**(23 - PAIR_BITS) / ranks), and the small rest."""
    import numpy as np
    high = np.float32(np.round(value * 2.0 ** PAIR_BITS) / 2.0 ** PAIR_BITS)
    return high, np.float32(value - float(high))


def pack_carried(grads, loss, flags, share):
    """The loss (weighted by this rank's share, as a float32 pair) and the flags into the spare
    slots after grads.data, where the gradient's allreduce sums them along with it."""
    spare = grads.storage[grads.data.size:]
    if spare.size < CARRIED + len(flags):
        raise ValueError(f"gradient buffer has {spare.size} spare slots, {CARRIED + len(flags)} needed")
    spare[:] = 0
    spare[0], spare[1] = _split_pair(loss * share)
    spare[CARRIED:CARRIED + len(flags)] = flags


def unpack_carried(grads, count):
    """After the allreduce: (the global loss, the `count` summed flags)."""
    spare = grads.storage[grads.data.size:]
    return float(spare[0]) + float(spare[1]), [float(f) for f in spare[CARRIED:CARRIED + count]]


class Single:
    """One process: the whole batch, nothing to exchange."""
    rank, size, local_rank, local_size, root = 0, 1, 0, 1, True

    def stream_range(self, batch_size):
        return 0, batch_size

    def allreduce_gradient(self, grads, loss, flags):
        return loss, list(flags)

    def mean_over_streams(self, value):
        return value

    def gather_streams(self, state):
        return state

    def check_identical(self, array):
        pass

    def root_first(self, work):
        return work()

    def agree(self, error=None):
        if error is not None:
            raise error

    def describe(self, rank_line, threads):
        return []

    def finish(self, status, message=None):
        return status


class MpiWorld:
    """MPI_COMM_WORLD, the node-local ranks (MPI's shared-memory split) and this rank's streams."""

    def __init__(self, MPI):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.root = self.rank == 0
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        # a separate communicator for finish(): its nonblocking barrier never meets training's collectives
        self.exit_comm = self.comm.Dup()
        self.share = None  # this rank's fraction of the global batch, set by stream_range()
        self.library = library_version(MPI.Get_library_version())
        self.host = MPI.Get_processor_name() or socket.gethostname()
        self._carrier = None

    def stream_range(self, batch_size):
        """This rank's [start, stop) of the global batch's streams."""
        start, stop = stream_range(batch_size, self.rank, self.size)
        self.share = (stop - start) / batch_size
        return start, stop

    def allreduce_gradient(self, grads, loss, flags):
        """One in-place allreduce (sum) of the flat gradient with the loss and the flags after it.

        grads: model.FlatBuffer whose `storage` has CARRIED + len(flags) spare float32 slots
        after `data`; data holds this rank's gradient of the mean over its own streams, so it is
        weighted by its share of the global batch first (exact for equal power-of-two splits).
        Returns (global loss, summed flags); every rank gets the same."""
        import numpy as np
        pack_carried(grads, loss, flags, self.share)
        if self.share != 1.0:
            grads.data *= np.float32(self.share)
        self.comm.Allreduce(self.MPI.IN_PLACE, grads.storage, op=self.MPI.SUM)
        return unpack_carried(grads, len(flags))

    def mean_over_streams(self, value):
        """A per-stream mean (e.g. a validation loss over this rank's streams) -> the global mean."""
        import numpy as np
        buffer = np.array([value * self.share])
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        return float(buffer[0])

    def gather_streams(self, state):
        """(L, 2, B_rank, H) per rank -> (L, 2, B, H) on rank 0 (None elsewhere); ranks in order."""
        import numpy as np
        parts = self.comm.gather(state, root=0)
        return np.concatenate(parts, axis=2) if self.root else None

    def check_identical(self, array):
        """Every rank must hold the same parameters (identical updates); a difference is a bug or
        an MPI whose allreduce gives ranks different sums: stop before it spreads."""
        import zlib
        digests = self.comm.allgather(zlib.crc32(memoryview(array).cast("B")))
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks' parameters differ (crc32 {digests}): the allreduce is not "
                               f"reproducible across ranks in this MPI ({self.library})")

    def root_first(self, work):
        """work() on rank 0 alone, then on the others: for work that fills a shared cache (the
        corpus's token file) that the others then read instead of all writing it at once. Bad
        input found by rank 0 is raised on every rank (agree), the others never start."""
        error = result = None
        if self.root:
            try:
                result = work()
            except UsageError as e:
                error = e
        self._wait_for_all(self.comm)
        self.agree(error)
        return result if self.root else work()

    def _wait_for_all(self, comm, deadline=None):
        """A barrier that sleeps while it waits (MPI's blocking calls spin, taking a core from
        the rank that works); True when every rank arrived before `deadline` (monotonic s)."""
        request = comm.Ibarrier()
        while not request.Test():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def agree(self, error=None):
        """A collective: raises on every rank when any rank passes an error (the lowest failing
        rank's message, so rank 0 can print it)."""
        reports = self.comm.allgather(None if error is None else (self.host, str(error)))
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if failed:
            rank, (host, text) = failed[0]
            raise UsageError(text if rank in (0, self.rank) else f"rank {rank} ({host}): {text}")

    def describe(self, rank_line, threads):
        """Header lines for rank 0: the MPI library, ranks x threads, each rank's host and CPUs
        (`rank_line`, this rank's description; `threads`, its thread count)."""
        reports = self.comm.gather((f"rank {self.rank}: {self.host}, {rank_line}", threads), root=0)
        if not self.root:
            return []
        counts = sorted({count for _, count in reports})
        per_rank = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return ([f"MPI: {self.library}, {self.size} ranks x {per_rank} thread{'s' * (per_rank != '1')} "
                 f"({self.local_size} ranks on rank 0's node)"] + [line for line, _ in reports])

    def finish(self, status, message=None):
        """Leave together: wait (at most FINISH_TIMEOUT_S) for every rank to get here. Ranks
        that stop at the same point (bad input found by all, the end of training, an agreed stop)
        meet and exit normally with `status`; if some rank is still busy or blocked, this one is
        the only one stopping, so it prints `message` (rank 0 already has) and aborts the job,
        rather than leaving the others waiting forever."""
        if not self._wait_for_all(self.exit_comm, time.monotonic() + FINISH_TIMEOUT_S):
            if message and not self.root:
                print(f"phi_rnn: error: rank {self.rank} ({self.host}): {message}", file=sys.stderr, flush=True)
                # Abort tears the job down at once: give the launcher time to forward the line
                time.sleep(ABORT_GRACE_S)
            self.comm.Abort(status or 1)
        return status
