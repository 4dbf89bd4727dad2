"""Untrusted identifiers -> file names, and stored relative paths -> paths under the state directory.

Anything that arrives over a network (Study/Series/SOP Instance UIDs and AE titles from a DICOM peer, bundle ids
and versions from a manifest or the twin) is attacker-controlled. It never becomes a path component as is:
:func:`safe_name` passes through only a short name of a conservative character set (every conformant DICOM UID,
PS3.5 9.1: digits and dots, at most 64 characters) and maps anything else to ``_`` + the SHA-256 hex of the
value. A passed-through name always starts with a letter or digit, a hashed one with ``_``, so the two forms never
collide.

:func:`uid_fault` and :func:`unpadded_uid` are the one check that a value is a valid DICOM UID (PS3.5 9.1, with the
UI padding of PS3.5 6.2); the receiver refuses an instance whose Study, Series or SOP Instance UID fails it.

Paths kept in the database are relative to the state directory (:func:`relative_to`); a reader turns them back
into paths with :func:`resolve_under`, which refuses an absolute path, a ``..`` escape and a symbolic link
leading out of the directory (:class:`UnsafePath`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MAX_NAME = 64  # a DICOM UID's maximum length (PS3.5 9.1); longer values are hashed
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


UID_MAX = 64  # PS3.5 9.1: at most 64 characters, digits and periods counted
_UID_CHARACTERS = frozenset("0123456789.")
UID_PADDING = ("\x00", " ")  # PS3.5 6.2 pads a UI value with NUL; SPACE (the other string VRs' padding) is tolerated


def uid_fault(value: str) -> str | None:
    """Why ``value`` is not a valid DICOM UID (PS3.5 9.1), or None when it is one.

    A valid UID is 1..64 characters of ``0-9`` and ``.`` only, made of components separated by single
    periods; every component is non-empty and has no leading zero unless it is ``0`` itself (so no leading,
    trailing or doubled period). ``value`` is taken as it is: remove the element's padding first
    (:func:`unpadded_uid`). The reason names the rule broken and never contains the value itself (a UID
    identifies a patient's study: logs carry pseudonyms only). pydicom's ``UID.is_valid`` is not used: its
    ``re.match(...$)`` accepts a trailing newline.
    """
    if not value:
        return "empty"
    if len(value) > UID_MAX:
        return f"{len(value)} characters, more than {UID_MAX}"
    if not _UID_CHARACTERS.issuperset(value):
        return "a character other than 0-9 and '.'"
    for component in value.split("."):
        if not component:
            return "an empty component (a leading, trailing or doubled '.')"
        if len(component) > 1 and component[0] == "0":
            return "a component with a leading zero"
    return None


def unpadded_uid(value: str) -> str:
    """The UID in a UI element's value as stored (PS3.5 6.2 and 9.1): ``value`` less its padding.

    A UID of odd length is followed by exactly one padding character to reach an even length: NUL, as
    PS3.5 6.2 requires, or SPACE, which many writers use and which is tolerated in its place. Any other
    padding (more than one character, padding after an even-length UID, leading or embedded whitespace)
    and any value that is not a valid UID (:func:`uid_fault`) raise ``ValueError`` whose message names
    the rule broken, never the value.
    """
    uid = value[:-1] if value.endswith(UID_PADDING) else value
    if uid != value and len(uid) % 2 == 0:
        if uid.endswith(UID_PADDING):
            raise ValueError("more than one padding character (PS3.5 6.2: one NUL after an odd-length UID)")
        raise ValueError("padding after an even-length UID (PS3.5 6.2 pads odd lengths only)")
    fault = uid_fault(uid)
    if fault is not None:
        raise ValueError(fault)
    return uid


class UnsafePath(ValueError):
    """A stored or derived path would leave the directory it must stay in."""


def safe_name(value: str, *, max_len: int = MAX_NAME) -> str:
    """One path component for an untrusted identifier ``value``.

    Returns ``value`` itself when it is 1..``max_len`` characters of ``[A-Za-z0-9._-]``, starting with a
    letter or digit and containing no ``..``; otherwise ``"_" + sha256(value).hexdigest()`` (65 characters;
    the value is encoded as UTF-8 with surrogates passed through, so any ``str`` maps, NUL included).
    Deterministic: the same value always gives the same name.
    """
    if 0 < len(value) <= max_len and _PLAIN.match(value) and ".." not in value:
        return value
    return "_" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _inside(root: str, candidate: str) -> bool:
    return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)


def resolve_under(root: Path, rel: str | os.PathLike[str]) -> Path:
    """The path ``root / rel``, checked to stay inside ``root``.

    ``rel`` must be relative; ``..`` components and symbolic links are resolved for the check
    (``os.path.realpath``, the target need not exist) and the result must lie in ``realpath(root)``; the path
    returned is ``root / normpath(rel)``. Raises :class:`UnsafePath`
    otherwise (an absolute ``rel``, an escape, an empty value or a NUL byte).
    """
    text = os.fspath(rel)
    if not text or "\x00" in text:
        raise UnsafePath(f"empty or NUL in stored path {text!r}")
    if os.path.isabs(text):
        raise UnsafePath(f"absolute path {text!r} where a path relative to {root} is required")
    real_root = os.path.realpath(root)
    candidate = os.path.realpath(os.path.join(real_root, text))
    if not _inside(real_root, candidate):
        raise UnsafePath(f"path {text!r} leaves {root}")
    return Path(root) / os.path.normpath(text)


def relative_to(root: Path, path: Path) -> str:
    """``path`` as stored in the database: relative to ``root`` (POSIX separators). Raises
    :class:`UnsafePath` when ``path`` is not inside ``root`` (after resolving links)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not _inside(real_root, real) or real == real_root:
        raise UnsafePath(f"{path} is not inside {root}")
    return Path(os.path.relpath(real, real_root)).as_posix()


def stored_relative(root: Path, value: str) -> str | None:
    """Migration helper: a stored path (absolute, or relative to ``root``) as a path relative to ``root``, or
    None when it does not lie inside ``root`` (such rows are flagged, and their files never deleted)."""
    try:
        path = Path(value) if os.path.isabs(value) else resolve_under(root, value)
        return relative_to(root, path)
    except (UnsafePath, ValueError):
        return None
