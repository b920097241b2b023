"""Errors a user can act on: bad input files, missing models, cancelled runs; and the exit statuses the commands give them.

Standard library only: the Slicer module reads the statuses of the engine it runs.
"""

EXIT_OK = 0
EXIT_INPUT_ERROR = 2  # an InputError: the message names the file or option and the fix
EXIT_CANCELLED = 130  # Cancelled (Ctrl-C or SIGTERM), as a shell reports SIGINT; nothing was written


class InputError(Exception):
    """Bad user input (file, option or model). The message names the file and the fix.

    The command-line interface prints it on one line and exits with status 2.
    """


class Cancelled(Exception):
    """The run was stopped by the user (Ctrl-C, SIGTERM or a cancel request)."""
