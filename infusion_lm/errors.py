"""Errors a user can act on. Each message names the problem and the fix."""


class InfusionError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class ConfigError(InfusionError):
    """The recipe or an override is malformed."""


class ModelNotFoundError(InfusionError):
    """No source could provide the requested model."""


class CorpusError(InfusionError):
    """The corpus cannot be read or is unusable."""


class MeasurementError(InfusionError):
    """The measurement is ill-defined for this model or data."""


class RunFolderError(InfusionError):
    """The run folder holds outputs that do not match this recipe or model."""
