"""The two errors a user meets: bad input (one line, exit 2) and a run that produced nothing (exit 1)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line and exits with status 2."""


class RunFailed(RuntimeError):
    """A run that finished without producing anything (one line, exit status 1)."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
