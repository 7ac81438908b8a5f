"""The one error type of bad user input (the ground floor: imports nothing of sparseheal)."""

from __future__ import annotations

__all__ = ["ConfigError", "StageError"]


class ConfigError(ValueError):
    """Bad user input. ``flag`` names the flag or key; the message says what is allowed."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


class StageError(RuntimeError):
    """A stage that started and could not finish well (training diverged, non-finite weights): nothing
    was written. ``flag`` names the setting most likely to blame."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message
