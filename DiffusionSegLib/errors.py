"""Errors a user can act on: bad input files, missing models, cancelled runs."""


class InputError(Exception):
    """Bad user input (file, option or model). The message names the file and the fix.

    The command-line interface prints it on one line and exits with status 2.
    """


class Cancelled(Exception):
    """The run was stopped by the user (Ctrl-C, SIGTERM or a cancel request)."""
