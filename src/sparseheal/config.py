"""Where ``ConfigError`` was first importable from; kept so that ``sparseheal.config.ConfigError`` works."""

from __future__ import annotations

from sparseheal.errors import ConfigError

__all__ = ["ConfigError"]
