"""The one error type every command turns into a one-line message and a non-zero exit."""

from __future__ import annotations

__all__ = ["ConfigError", "IotgwError"]


class IotgwError(Exception):
    """A failure the user can act on, described in one line (never a traceback).

    `exit_code` follows the shell convention the CLI uses: 2 for bad input or
    configuration, 1 for a service that is unreachable or failed.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(IotgwError):
    """Invalid settings: one line per bad field."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
