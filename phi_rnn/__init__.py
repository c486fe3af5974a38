"""phi_rnn: char-rnn compatible character-level RNNs trained fast on many-core CPUs."""
from phi_rnn import caches

__version__ = "0.1.0"

# Before anything imports numba, which reads its cache directory once: an install users
# cannot write to, under a home they cannot write to, still finds a place for the kernels.
caches.configure_kernel_cache()
