"""The one exception type the launchers turn into a one-line error message."""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad user input, found before any work starts.

    The message is one line that names the flag (or file) at fault and says how to fix it,
    e.g. ``--layer_map: student block 12 does not exist (student has 10 blocks, 0-9); use 0-9``.
    Launchers print it as ``error: <message>`` and exit with status 2, like argparse.
    """
