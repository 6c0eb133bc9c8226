"""omh-ref's own error types: bad user input (the CLI prints its message on one line and exits
2), non-finite numbers where finite ones are needed (training reports them as a divergence), and
a Ctrl-C that knows what it left behind."""


class InputError(ValueError):
    """Bad input (a file, an argument, a config): the message names it and says what was expected."""


class NonFiniteError(ValueError):
    """NaN or inf met where finite numbers are needed (a Sinkhorn cost or marginal, a training
    step's loss or gradients). The training loop catches this type, and only this one, as a
    divergence; any other exception is a bug and keeps its traceback."""


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C caught by a job that can say what is kept and how to continue (the message); the
    CLI prints ``interrupted: <message>`` and exits 130, as for any KeyboardInterrupt."""
