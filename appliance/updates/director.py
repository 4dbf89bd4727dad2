"""The director's document: the twin's desired ``model_updates`` (see :mod:`appliance.updates.layout`).

Validated as a whole before anything acts on it (an invalid document is rejected back through the twin's
``desired_status`` and nothing changes), like every other desired property. Uptane calls this the director:
it says what this box should run; the TUF repository says what is genuine.
"""

from __future__ import annotations

import datetime as dt
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engines.manifest import BUNDLE_ID, SEMVER

_WINDOW = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])\Z")  # ASCII digits only


class Policy(BaseModel):
    """Rollout policy: the maintenance window (``"HH:MM-HH:MM"`` local time; it may wrap midnight; None = any
    time) and the health gate (``health_studies`` real studies without engine errors within
    ``health_deadline_s`` seconds of activation, else rollback)."""

    model_config = ConfigDict(extra="forbid")

    window: str | None = None
    health_studies: int = Field(default=1, ge=0, le=1000)
    health_deadline_s: float = Field(default=86400.0, gt=0, le=30 * 86400)

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is not None and not _WINDOW.match(v):
            raise ValueError(f"window {v!r} is not HH:MM-HH:MM")
        return v

    def in_window(self, now: dt.datetime) -> bool:
        """True if ``now`` (local wall time) is inside the window; a window whose ends are equal is all day."""
        if self.window is None:
            return True
        m = _WINDOW.match(self.window)
        assert m is not None
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3]) * 60 + int(m[4])
        t = now.hour * 60 + now.minute
        if start == end:
            return True
        return start <= t < end if start < end else (t >= start or t < end)


class Target(BaseModel):
    """The version one bundle id should run."""

    model_config = ConfigDict(extra="forbid")

    version: str

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        if not SEMVER.match(v):  # the manifest's own rule (semantic versioning 2.0)
            raise ValueError(f"not a semantic version: {v!r}")
        return v


class Director(BaseModel):
    """``desired.model_updates``: ``bundles`` (bundle id -> :class:`Target`) and one :class:`Policy`."""

    model_config = ConfigDict(extra="forbid")

    bundles: dict[str, Target] = Field(default_factory=dict)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("bundles")
    @classmethod
    def _ids(cls, v: dict[str, Target]) -> dict[str, Target]:
        for bundle_id in v:
            if not BUNDLE_ID.match(bundle_id):
                raise ValueError(f"bundle id {bundle_id!r} is not a valid bundle id")
        return v


def parse_director(doc: object) -> Director:
    """Validate a desired ``model_updates`` value. Raises ValueError naming every problem."""
    try:
        return Director.model_validate(doc)
    except ValidationError as exc:
        reasons = [f"model_updates.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ValueError("; ".join(reasons)) from exc
