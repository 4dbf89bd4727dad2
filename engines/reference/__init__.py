"""The shipped reference bundles (cxr-phantom, mmg-phantom) and the PUBLIC half of the DEMO key that signs them.

The demo key's private half is committed to the public repository (``training/keys/``, not shipped in the wheel),
so anyone can sign anything with it: a box trusts it only when ``engines.trust_demo_key`` is set (``appliance
demo`` and tests), and ``appliance config check`` reports it as a problem.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REFERENCE_DIR = Path(str(resources.files(__name__)))
BUNDLES_DIR = REFERENCE_DIR / "bundles"
DEMO_PUBLIC_KEY = REFERENCE_DIR / "keys" / "DEMO-ONLY.pub"


def demo_key() -> tuple[str, str]:
    """(key id, base64 Ed25519 public key) of the DEMO key that signs the reference bundles."""
    from engines.keys import read_public_key_file

    return read_public_key_file(DEMO_PUBLIC_KEY)


def publicly_known_key_ids() -> frozenset[str]:
    """Key ids whose PRIVATE half is public (committed to the repository): never to be trusted in a clinic."""
    return frozenset({demo_key()[0]})


def reference_bundles() -> list[Path]:
    """The shipped reference bundle files, sorted by name."""
    return sorted(BUNDLES_DIR.glob("*.bundle"))
