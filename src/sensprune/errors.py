"""User-facing errors: one line, naming the problem and the fix. The CLI prints them without a
traceback and exits with status 2 (1 for a run that diverged)."""


class SensPruneError(Exception):
    """A mistake in the user's input (arguments, files, configuration)."""


class DataError(SensPruneError):
    """A dataset file is missing, truncated, corrupt or of the wrong kind."""


class ConfigError(SensPruneError):
    """A recipe or command-line option is invalid."""


class CheckpointError(SensPruneError):
    """A checkpoint or exported model cannot be read."""


class TrainingDiverged(SensPruneError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""
