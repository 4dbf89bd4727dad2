"""Text from outside the box (twin properties, audit entries, DICOM values) made safe to print on a terminal.

A value that reached the box from the network or a device can carry terminal control sequences (ESC ``[2J``
clears the screen, ESC ``[1A`` ESC ``[2K`` erases the line above, OSC sets the window title or a link), line
breaks that fake extra rows, bidirectional overrides that reorder what is read, and, for rich, console markup
(``[/bold]`` raises, ``[link=...]`` makes a link). :func:`printable` escapes the first three; :func:`cell`
also keeps rich from reading markup.
"""

from __future__ import annotations

import re
from typing import Any

from rich.text import Text

# C0 controls (line breaks and tabs included), DEL, C1 controls, and the Unicode bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069) and marks that reorder or hide text.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with every control character and bidirectional override written as ``\\xNN`` or
    ``\\uNNNN``, so it prints as one line of inert text. ``None`` gives ``""``."""
    if value is None:
        return ""
    return _UNSAFE.sub(_escape, str(value))


def cell(value: Any, empty: str = "") -> Text:
    """A rich table cell showing ``value`` literally (:func:`printable`, no console markup); ``empty`` for
    ``None`` or ``""``."""
    text = printable(value)
    return Text(text if text else empty)
