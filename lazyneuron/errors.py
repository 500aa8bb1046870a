"""Errors raised by lazyneuron. Every message names the bad value and the fix."""

from __future__ import annotations


class LazyNeuronError(Exception):
    """Base class of every error lazyneuron raises on bad input."""


class ConfigError(LazyNeuronError, ValueError):
    """A method config holds an invalid value."""


class UnsupportedModelError(LazyNeuronError):
    """No adapter could map the model's modules onto roles."""


class NoMatchError(LazyNeuronError):
    """A config's targets matched no module of the model."""


class CalibrationError(LazyNeuronError):
    """Calibration data is missing, too short, non-finite, corrupt or mismatched."""


class MissingPackageError(LazyNeuronError, ImportError):
    """An optional package that holds a model or corpus is not installed."""

    def __init__(self, package: str, what: str, install: str) -> None:
        super().__init__(f"{what} needs the package {package!r}, which is not installed. Install it with:\n    {install}")
        self.package = package
        self.install = install
