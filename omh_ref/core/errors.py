"""The one error type for bad user input: the CLI prints its message on one line and exits 2."""


class InputError(ValueError):
    """Bad input (a file, an argument, a config): the message names it and says what was expected."""
