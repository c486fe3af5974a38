"""phi_rnn: char-rnn compatible character-level RNNs trained fast on many-core CPUs."""
__version__ = "0.1.0"
