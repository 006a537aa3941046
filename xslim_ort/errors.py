"""One exception type for every user-facing failure.

The CLI turns an ``XSlimError`` into one line on stderr and its ``exit_code``; library
callers can catch it. Anything else escaping the pipeline is a bug in xslim-ort.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # something went wrong while quantizing
EXIT_USAGE = 2  # bad usage, config, model or data given by the user


class XSlimError(Exception):
    """A failure with a message meant for the user, and the exit code the CLI should use."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class ConfigError(XSlimError):
    """The config (file, dict or flags) is invalid."""


class DataError(XSlimError):
    """Calibration or evaluation data is missing, unreadable or of the wrong shape."""


class ModelError(XSlimError):
    """The input model cannot be used (missing, unreadable, already quantized, ...)."""


class QuantizationError(XSlimError):
    """A failure while quantizing that is not the user's input's fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_FAILURE)
