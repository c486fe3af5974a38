"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class UsageError(Exception):
    """A problem with the user's input (flags, files, checkpoints) rather than a bug."""

    exit_status = 2
