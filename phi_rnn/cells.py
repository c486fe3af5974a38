"""The cell types, listed once. Imports nothing, so that the command line's flag module can
read it before any numeric runtime loads (phi_rnn.affinity); phi_rnn.model re-exports it."""
GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # gate blocks: LSTM i, f, o, g; GRU z, r, c; RNN one
MODELS = tuple(GATES)
KINDS = {model: code for code, model in enumerate(MODELS)}  # the compiled kernels' code of each
