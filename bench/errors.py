"""One error type for bad input: the CLI prints its message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input the user can fix. The message says what is wrong and how to fix it."""

    exit_code = 2
