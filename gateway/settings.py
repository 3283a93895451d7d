"""Settings shared by every part of the gateway process (the ``[core]`` section)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """Process-wide settings.

    ``data_dir`` holds the SQLite state, generated keys and the dev CA; ``log_format`` is
    ``json`` (one object per line, for collectors) or ``text`` (for people).
    """

    data_dir: Path = Path("/var/lib/gateway")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
