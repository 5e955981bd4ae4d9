"""The exceptions the command line turns into a one-line message (no torch here: the CLI
imports this module before it validates its arguments)."""


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with status 2."""


class TrainingStopped(Exception):
    """Training ended early (divergence or interruption); the message says what was kept."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingWarning(UserWarning):
    """Training finished, but its result looks wrong (e.g. the bound fell)."""
