"""phi_rnn's benchmarks: scripts run by path (`python bench/speed.py`), and the scaling study,
the package bench.scale (`python -m bench.scale`)."""
