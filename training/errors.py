"""Errors a user can fix; the CLI prints their message on one line and exits non-zero."""


class TrainingError(RuntimeError):
    """Base for every expected failure of the training CLI."""


class DataError(TrainingError):
    """The dataset cannot be loaded (unknown name, missing or empty folder, bad files)."""


class ConfigError(TrainingError):
    """A flag has a value that cannot work (unknown arch, bad split, ...)."""


class ParityError(TrainingError):
    """An exported model disagrees with the eager model; nothing is published."""


class QuantizationError(TrainingError):
    """The int8 model failed its accuracy gate (or could not be built); nothing is published."""
