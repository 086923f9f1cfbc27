"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class ArchiFactoryError(Exception):
    """A user-facing problem: the message names what is wrong and how to fix it, in one line."""
