"""Errors that end a command with one line and exit status 2.

Bad input (a config, a trace, a dump, the command line) is the user's to fix, so
it never shows a traceback: the CLI catches :class:`InputError`, prints its
message (which names the file, the key or offset, and the reason) and exits 2.
"""


class InputError(Exception):
    """Bad user input; the message is the whole diagnostic, on one line."""

    def __init__(self, message: str):
        super().__init__(message.replace("\n", " "))
