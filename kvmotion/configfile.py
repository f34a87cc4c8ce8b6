"""Config files of kvmotion's services: JSON read into a frozen pydantic model, written 0600
(they hold tokens). The host agent's and the center's configs both are one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict

from kvmotion.errors import InvalidInput


class ConfigFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    @classmethod
    def load(cls, path: Path) -> Self:
        """Raises InvalidInput naming the file when it cannot be read or is not valid."""
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read config {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        path.chmod(0o600)
