"""The few places the appliance relies on a dependency's private internals, each behind one function.

Why: a private attribute can change in any release without notice. Keeping each use here, with a test in
``tests/test_compat.py`` that asserts the attribute still exists and behaves as used, turns such a change
into one failing test instead of a wrong result somewhere in the pipeline. Use the public API wherever
there is one; add here only what has none (or none that is affordable on the hot path, said why).
"""

from __future__ import annotations

import highdicom as hd


def attach_sr_content(sr: hd.sr.Comprehensive3DSR, root: hd.sr.ContentItem) -> None:
    """Make ``root`` (the typed root CONTAINER of a TID 1500 tree, already built and owned by the caller)
    the content of ``sr``, without the copy highdicom's constructor makes.

    ``sr`` must have been built with a stub of ``root`` (same root attributes, empty ContentSequence).
    Afterwards ``sr.ContentSequence`` is ``root.ContentSequence`` (the dataset, what highdicom assigns too)
    and ``sr.content`` is the typed tree ``ContentSequence([root], is_root=True)``, as after highdicom's
    own constructor. Private: highdicom keeps that tree in ``_SR._content`` and has no setter; the public
    route, ``Comprehensive3DSR.from_dataset(sr, copy=False)``, re-types the whole tree (+50% of the SR's
    build time, measured with a 4-view mammogram). Checked by tests/test_compat.py.
    """
    sr.ContentSequence = root.ContentSequence
    sr._content = hd.sr.ContentSequence([root], is_root=True)
