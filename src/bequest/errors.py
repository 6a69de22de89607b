"""The one exception type that means "the user asked for something we cannot do"."""


class BequestError(Exception):
    """A user error: the CLI prints the one-line message and exits with code 2."""
