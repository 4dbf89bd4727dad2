"""One exception family for the engines, each carrying a machine-readable ``reason`` code.

Why: a rejected bundle or a failed engine must be reported to the cloud and to the technician with a
stable code (``reason``) besides the human message, so dashboards can count causes and tests can assert
them without matching text.
"""

from __future__ import annotations


class EnginesError(Exception):
    """Base class. ``reason`` is a short snake_case code; ``bundle`` names the bundle when known."""

    reason: str = "error"

    def __init__(self, reason: str, message: str, *, bundle: str | None = None):
        self.reason = reason
        self.bundle = bundle
        prefix = f"{bundle}: " if bundle else ""
        super().__init__(f"{prefix}{message} [{reason}]")


class BundleError(EnginesError):
    """A bundle was refused (format, trust, integrity, version). Nothing was installed.

    Reasons: not_a_bundle, path_traversal, link_member, bad_member_type, duplicate_member, too_many_members,
    oversized_member, oversized_bundle, missing_file, unlisted_file, hash_mismatch, bad_manifest,
    noncanonical_manifest, unsigned, bad_signature_file, bad_signature, unknown_key, revoked_key, expired,
    external_data, bad_model, appliance_too_old, downgrade, version_conflict, not_installed, no_active_version.
    """


class TrustError(EnginesError):
    """The trust configuration itself is wrong (reasons: bad_key_id, duplicate_key_id, key_id_mismatch,
    bad_public_key, bad_private_key)."""


class EngineBuildError(EnginesError):
    """A backend could not be chosen, or could not load or compile a bundle's model (reasons: unknown_backend,
    backend_unavailable, bad_backend_options, model_load_failed, build_failed, incompatible_plan, bad_input)."""


class GoldenCheckError(EnginesError):
    """A compiled engine does not reproduce the bundle's golden outputs within tolerance; never activated."""

    def __init__(self, message: str, *, bundle: str | None = None, report: dict | None = None):
        super().__init__("golden_mismatch", message, bundle=bundle)
        self.report = report or {}
