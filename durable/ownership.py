"""Files the service can read: what a command run as root writes under the state directory is handed to the
directory's owner.

The daemon runs as an unprivileged service user (``appliance``) that owns the state directory. A technician
often runs the command line as root (``sudo appliance provision dps``, ``sudo appliance model install``); files it
creates there (``secrets/device_key`` 0600, ``models/.../state.json``, the database's ``-wal``/``-shm``) would then
be root's and the service could not read them: it would never connect, or never load a model. So after each
command the command line calls :func:`hand_over`: when the process runs as root and the state directory belongs
to another user, every file, folder and link under it that root owns is given to that user and group (``lchown``:
a link itself, never its target). Modes are kept: a secret stays 0600, now the service's. Nothing happens for a
command run as the service user or as root on a root-owned directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def service_owner(root: Path) -> tuple[int, int] | None:
    """(uid, gid) of ``root`` when this process runs as root and ``root`` belongs to another user; else None."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def hand_over(root: Path) -> int:
    """Give every entry under ``root`` that uid 0 owns to ``root``'s owner (see the module doc); returns how many
    entries changed. Symbolic links are not followed (their own ownership changes). Raises ``OSError`` only if
    an entry cannot be changed (it is left as it was)."""
    owner = service_owner(root)
    if owner is None:
        return 0
    uid, gid = owner
    changed = 0
    stack = [Path(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if st.st_uid == 0:
                    os.lchown(entry.path, uid, gid)
                    changed += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    return changed
