"""Start numba and MKL in the test process the way the CLI does: thread settings first."""
import os
import sys

from phi_rnn import affinity

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Two threads (or one on a 1-CPU box), no binding: the batch strategy really runs in parallel.
affinity.configure(threads=min(2, len(os.sched_getaffinity(0))), policy="none")
