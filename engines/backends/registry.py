"""The backend plugin registry: type key -> plugin class, discovered from this package's modules.

Every module of :mod:`engines.backends` is imported once, on the first lookup, and registers its plugin
with the :func:`register` decorator; so adding a backend is adding one module (plus its tests). ``auto``
picks the available plugin with the lowest ``preference``; an explicitly named backend that cannot run
here is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import ValidationError

from engines.backends.base import BackendPlugin, PluginConfig, Profile
from engines.errors import EngineBuildError

log = logging.getLogger(__name__)

AUTO = "auto"
P = TypeVar("P", bound=type[BackendPlugin])

_plugins: dict[str, type[BackendPlugin]] = {}
_discovered = False
_SKIP = {"base", "registry"}


def register(cls: P) -> P:
    """Class decorator: make ``cls`` selectable by its ``type_key``. Raises ValueError on a duplicate key
    or a missing/reserved one."""
    key = getattr(cls, "type_key", None)
    if not isinstance(key, str) or not key or key == AUTO:
        raise ValueError(f"{cls.__name__}: type_key must be a non-empty string other than {AUTO!r}")
    if key in _plugins and _plugins[key] is not cls:
        raise ValueError(f"backend {key!r} already registered by {_plugins[key].__name__}")
    _plugins[key] = cls
    return cls


def unregister(key: str) -> None:
    """Remove a registered backend (tests that register their own plugin clean up with this)."""
    _plugins.pop(key, None)


@contextmanager
def registered(cls: type[BackendPlugin]) -> Iterator[type[BackendPlugin]]:
    """Register ``cls`` for the duration of a ``with`` block (for test-only plugins)."""
    _discover()
    register(cls)
    try:
        yield cls
    finally:
        unregister(cls.type_key)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import engines.backends as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _SKIP and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _discovered = True


def names() -> tuple[str, ...]:
    """Registered type keys in ``auto``'s preference order (most preferred first), available or not."""
    _discover()
    return tuple(k for k, _ in sorted(_plugins.items(), key=lambda kv: (kv[1].preference, kv[0])))


def plugin_class(key: str) -> type[BackendPlugin]:
    """The plugin class registered as ``key``. Raises EngineBuildError("unknown_backend") otherwise."""
    _discover()
    try:
        return _plugins[key]
    except KeyError:
        choices = ", ".join((AUTO, *names()))
        raise EngineBuildError("unknown_backend", f"unknown backend {key!r} (one of: {choices})") from None


def availability() -> dict[str, tuple[bool, str]]:
    """Every registered backend -> (can run here, why not), in preference order."""
    return {k: plugin_class(k).available() for k in names()}


def select(requested: str = AUTO) -> type[BackendPlugin]:
    """Resolve ``auto`` or a type key to a plugin class that can run here.

    Raises EngineBuildError: ``unknown_backend`` for an unregistered key, ``backend_unavailable`` when the
    named backend (or, for ``auto``, every backend) cannot run on this machine, with the reason.
    """
    if requested != AUTO:
        cls = plugin_class(requested)
        ok, why = cls.available()
        if not ok:
            raise EngineBuildError("backend_unavailable", f"backend {requested!r} requested but {why}")
        return cls
    reasons = []
    for key in names():
        cls = _plugins[key]
        ok, why = cls.available()
        if ok:
            return cls
        log.debug("backend %s not available: %s", key, why)
        reasons.append(f"{key}: {why}")
    raise EngineBuildError("backend_unavailable", "no backend can run here (" + "; ".join(reasons) + ")")


def configure(key: str, options: Mapping[str, Any] | None) -> PluginConfig:
    """Validate ``options`` against backend ``key``'s own ``Config`` model (no availability check, so a
    configuration can be checked on any machine). Raises EngineBuildError: unknown_backend,
    bad_backend_options."""
    cls = plugin_class(key)
    try:
        return cls.Config.model_validate(dict(options or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise EngineBuildError("bad_backend_options", f"options of backend {key!r}: {problems}") from exc


def create(
    requested: str, plugin_options: Mapping[str, Mapping[str, Any]] | None = None, profile: Profile | None = None
) -> BackendPlugin:
    """:func:`select` a plugin and configure it: its own options are ``plugin_options[type_key]`` (missing =
    defaults), the shared ones ``profile``. Raises EngineBuildError (unknown_backend, backend_unavailable,
    bad_backend_options)."""
    cls = select(requested)
    config = configure(cls.type_key, (plugin_options or {}).get(cls.type_key))
    return cls(config, profile or Profile())
