"""``StrEnum`` for every Python the box runs on (3.11+, and 3.10 on JetPack 6, which lacks ``enum.StrEnum``)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    from enum import Enum

    class StrEnum(str, Enum):
        """An Enum whose members are their string values (as Python 3.11's ``enum.StrEnum``)."""

        def __str__(self) -> str:
            return str(self.value)


__all__ = ["StrEnum"]
