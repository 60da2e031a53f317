"""User-facing errors: one line, naming the problem and the fix. The CLI prints them without a
traceback and exits with status 2 (1 for a run that diverged)."""


class SensPruneError(Exception):
    """A mistake in the user's input (arguments, files, configuration)."""


class DataError(SensPruneError, ValueError):
    """A dataset file is missing, truncated, corrupt or of the wrong kind."""


class ConfigError(SensPruneError, ValueError):
    """A setting is invalid (a recipe, a command-line option, or a library argument): a
    ValueError, as Python code expects of a bad argument."""


class CheckpointError(SensPruneError, ValueError):
    """A checkpoint or exported model cannot be read."""


class TrainingDiverged(SensPruneError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""
