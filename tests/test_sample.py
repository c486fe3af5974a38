"""Sampling through the real CLI and the Generator: seeded draws reproduce, argmax is
deterministic, primetext is echoed, temperature sharpens (the batch-of-one step is checked
against the training network in test_models.py)."""
import numpy as np
import pytest

from cli_helpers import run_cli, trained_checkpoint
from phi_rnn import checkpoint
from phi_rnn.errors import UsageError
from phi_rnn.sample import Generator


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    return trained_checkpoint(tmp, 30000, 60)[1]


def test_seeded_sampling_reproduces_and_seeds_differ(trained):
    a = run_cli("sample", trained, "--length", 300, "--seed", 7, check=True).stdout
    b = run_cli("sample", trained, "--length", 300, "--seed", 7, check=True).stdout
    c = run_cli("sample", trained, "--length", 300, "--seed", 8, check=True).stdout
    assert a == b and a != c
    assert len(a) == 300 + 1  # and a final newline


def test_argmax_is_deterministic_and_primetext_echoed(trained):
    a = run_cli("sample", trained, "--sample", 0, "--primetext", "ROMEO:", "--length", 200, "--seed", 1, check=True)
    b = run_cli("sample", trained, "--sample", 0, "--primetext", "ROMEO:", "--length", 200, "--seed", 2, check=True)
    assert a.stdout == b.stdout and a.stdout.startswith("ROMEO:")
    assert len(a.stdout) == len("ROMEO:") + 200 + 1


def test_temperature_sharpens_the_distribution(trained):
    low = run_cli("sample", trained, "--length", 2000, "--temperature", 0.2, check=True).stdout
    high = run_cli("sample", trained, "--length", 2000, "--temperature", 1.5, check=True).stdout
    assert len(set(low)) < len(set(high))


def test_unknown_primetext_characters_are_named(trained):
    with pytest.raises(UsageError, match=r"not in the model's vocabulary: '€'"):
        Generator(checkpoint.load(trained)).encode("a€b")
