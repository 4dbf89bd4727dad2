"""The appliance's one configuration: a TOML file overridden by ``APPLIANCE_*`` environment variables.

Every key has a safe default so the box runs with no file at all. Nested keys are overridden with a
double underscore, e.g. ``APPLIANCE_DICOM__PORT=11113``; ``APPLIANCE_STATE_DIR`` moves the state dir.
Each subsystem owns one section class below; nothing else reads configuration files.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

DEFAULT_CONFIG_FILE = Path("/etc/appliance/appliance.toml")
DEFAULT_STATE_DIR = Path("/var/lib/appliance")


class Section(BaseModel):
    """Base of every section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AllowedCaller(Section):
    ae_title: str = Field(min_length=1, max_length=16)
    host: str | None = Field(default=None, description="IP address or network (CIDR); None = any")

    @field_validator("host")
    @classmethod
    def _valid_host(cls, v: str | None) -> str | None:
        if v is not None:
            ipaddress.ip_network(v, strict=False)
        return v


class DicomConfig(Section):
    """DICOM receive (C-ECHO / C-STORE SCP)."""

    ae_title: str = Field(default="APPLIANCE", min_length=1, max_length=16)
    bind: str = Field(default="127.0.0.1", description="0.0.0.0 in a clinic so modalities can reach it")
    port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=10, ge=1, le=1000, description="established associations at once")
    max_pending_connections: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="connections without a complete A-ASSOCIATE-RQ yet; a new one beyond this closes the oldest",
    )
    max_pdu: int = Field(default=0, ge=0, description="0 = unlimited (fastest)")
    acse_timeout: float = Field(
        default=30.0, gt=0, description="ARTIM: seconds from TCP connect to a complete A-ASSOCIATE-RQ (PS3.8 9.1.5)"
    )
    dimse_timeout: float = Field(default=30.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    allowlist_enabled: bool = False
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    quiet_seconds: float = Field(default=2.0, ge=0)
    min_free_bytes: int = Field(default=2 * 1024**3, ge=0, description="answer 0xA700 below this")
    accept_all_storage: bool = Field(
        default=False, description="accept every storage SOP class, not only CR/DX/MG/CT/SC and CT dose SR"
    )
    max_instance_bytes: int = Field(
        default=1024**3, ge=1024**2, description="a larger data set is drained and refused (0xA700), never buffered"
    )
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="wait this long for associations at stop")

    @field_validator("ae_title")
    @classmethod
    def _ae_chars(cls, v: str) -> str:
        if not v.isascii() or "\\" in v or not v.strip():
            raise ValueError("AE title must be 1-16 printable ASCII characters without backslash")
        return v.strip()


class EnginesConfig(Section):
    """Inference backends and model trust."""

    backend: str = Field(default="auto", description="auto, or a backend plugin's type key: ort, tensorrt")
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="[engines.plugins.<backend>]: that backend's own options"
    )
    # Flat keys kept for existing config files; [engines.plugins.ort] / [engines.plugins.tensorrt] win over them.
    ort_intra_op_threads: int = Field(default=0, ge=0, description="0 = ONNX Runtime decides")
    ort_inter_op_threads: int = Field(default=1, ge=0)
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    trt_workspace_mib: int = Field(default=1024, ge=64)
    trusted_keys: dict[str, str] = Field(
        default_factory=dict, description="key id (16 hex digits) -> Ed25519 public key (base64): the central team's"
    )
    trust_demo_key: bool = Field(
        default=False,
        description="DEMO AND TESTS ONLY: trust the reference bundles' demo key, whose private half is public",
    )
    revoked_keys: list[str] = Field(default_factory=list, description="key ids refused even if trusted")
    install_reference_bundles: bool = Field(
        default=False,
        description="DEMO ONLY: install the shipped reference bundles (NOT FOR CLINICAL USE; need trust_demo_key)",
    )
    max_batch: int = Field(default=8, ge=1, le=256, description="largest batch an engine is built/sized for")

    @field_validator("trusted_keys")
    @classmethod
    def _trusted_key_ids(cls, v: dict[str, str]) -> dict[str, str]:
        from engines.errors import TrustError
        from engines.keys import normalise_key_id

        out: dict[str, str] = {}
        for raw, b64 in v.items():
            try:
                kid = normalise_key_id(raw, what="trusted key id")
            except TrustError as exc:
                raise ValueError(str(exc)) from None
            if kid in out:
                raise ValueError(f"trusted key id {kid} is listed twice")
            out[kid] = b64
        return out

    @field_validator("revoked_keys")
    @classmethod
    def _revoked_key_ids(cls, v: list[str]) -> list[str]:
        from engines.errors import TrustError
        from engines.keys import normalise_key_id

        try:
            return sorted({normalise_key_id(k, what="revoked key id") for k in v})
        except TrustError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from engines.backends import registry

        if v != registry.AUTO and v not in registry.names():
            raise ValueError(f"unknown backend {v!r}, one of: {', '.join((registry.AUTO, *registry.names()))}")
        return v

    @field_validator("plugins")
    @classmethod
    def _valid_plugin_options(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from engines.backends import registry
        from engines.errors import EngineBuildError

        for key, options in v.items():
            try:
                registry.configure(key, options)
            except EngineBuildError as exc:
                raise ValueError(str(exc)) from None
        return v

    def plugin_options(self) -> dict[str, dict[str, Any]]:
        """Each backend's own options: the flat legacy keys, overridden by ``[engines.plugins.<backend>]``."""
        out: dict[str, dict[str, Any]] = {
            "ort": {"intra_op_threads": self.ort_intra_op_threads, "inter_op_threads": self.ort_inter_op_threads},
            "tensorrt": {"workspace_mib": self.trt_workspace_mib},
        }
        for key, options in self.plugins.items():
            out[key] = {**out.get(key, {}), **options}
        return out


class PacsDestination(Section):
    name: str = Field(min_length=1)
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    # Send this PACS the "AI not applied" notice (a Secondary Capture) of a study a model's modality matched but
    # whose every image the model's input gate refused (study state not_analysed).
    send_ai_not_applied: bool = True


class RouteRule(Section):
    """A local routing rule: narrow (include) or switch off (exclude) a bundle for some studies.

    Empty lists match anything. A bundle with include rules runs only on studies one of them matches; an
    exclude rule that matches stops it. Matching is case-insensitive.
    """

    bundle_id: str = Field(min_length=1)
    action: Literal["include", "exclude"] = "include"
    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    calling_aes: list[str] = Field(default_factory=list)


class PipelineConfig(Section):
    """Routing, inference worker and result export."""

    enabled: bool = True
    queue_size: int = Field(default=64, ge=1)
    inference_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="a study interrupted or crashing this often is ended failed"
    )
    max_pixels: int = Field(default=100_000_000, ge=1, description="rows*columns*frames above this is refused")
    destinations: list[PacsDestination] = Field(default_factory=list)
    retry_initial_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    min_image_size: int = Field(default=16, ge=1, description="rows or columns below this: not processable")
    sc_max_size: int = Field(default=1024, ge=128, le=8192, description="long side of the SC overlay, pixels")
    export_timeout_s: float = Field(default=30.0, gt=0, description="association/DIMSE timeout per export")
    export_batch: int = Field(default=64, ge=1, description="objects sent per association")
    poll_s: float = Field(default=1.0, gt=0, description="how often the worker/exporter look for work")
    routes: list[RouteRule] = Field(default_factory=list)
    early_prepare: bool = Field(default=True, description="prepare each image as it arrives (daemon)")
    early_prepare_threads: int = Field(default=1, ge=1, le=2, description="threads preparing arriving images")
    early_cache_mb: int = Field(default=64, ge=1, description="memory cap of the prepared-image cache")
    early_queue_size: int = Field(default=512, ge=1, description="arrived images waiting; beyond it: skipped")
    early_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="worker waits this long for an image already being prepared (never slower than redoing it)",
    )
    early_max_defer_s: float = Field(default=1.0, ge=0, description="wait (at most) for receiving to stop")


class CloudConfig(Section):
    """Azure IoT Hub sync (see docs/CLOUD.md)."""

    enabled: bool = False
    hub_hostname: str = Field(default="", description="e.g. myhub.azure-devices.net (username and SAS resource)")
    connect_host: str | None = Field(default=None, description="address to dial; None = hub_hostname (tests)")
    device_id: str = ""
    auth: Literal["sas", "x509"] = "sas"
    port: int = Field(default=8883, ge=1, le=65535)
    ca_file: str | None = Field(default=None, description="CA bundle for the hub; None = system store")
    device_key_file: str | None = Field(default=None, description="SAS key (base64); None = secrets/device_key")
    cert_file: str | None = Field(default=None, description="X.509 client cert (PEM); None = secrets/device.crt")
    key_file: str | None = Field(default=None, description="X.509 client key (PEM); None = secrets/device.key")
    keepalive_s: int = Field(default=240, ge=30, le=1177, description="hub times out at 1.5x, max 1767 s")
    sas_ttl_s: int = Field(default=3600, ge=5, description="token lifetime; renewed by reconnecting early")
    sas_renew_fraction: float = Field(default=0.8, gt=0.1, lt=1.0, description="reconnect at this share of TTL")
    backoff_min_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=100.0, gt=0)
    backoff_jitter_s: float = Field(default=5.0, ge=0)
    max_inflight: int = Field(default=20, ge=1, le=1000, description="unacknowledged QoS 1 publishes")
    health_interval_s: float = Field(default=900.0, ge=1.0, description="health message period (twin can set)")
    upload_results: bool = Field(default=True, description="False pauses result upload (twin can set)")
    recipient_keys: dict[str, str] = Field(
        default_factory=dict, description="key id -> X25519 public key (base64) of the central team"
    )
    keyset_trusted_keys: dict[str, str] = Field(
        default_factory=dict,
        description="key id -> Ed25519 public key (base64) whose signature makes a twin recipient_keyset acceptable",
    )
    deid_retain_patient_characteristics: bool = Field(
        default=False, description="PS3.15 option: keep sex and age in years (default: removed)"
    )
    outbox_ttl_days: int = Field(default=60, ge=1)
    outbox_max_bytes: int = Field(default=512 * 1024**2, ge=1024**2)
    twin_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="a twin GET or reported PATCH unanswered this long is sent again"
    )


class UpdatesConfig(Section):
    """Over-the-air model updates (appliance/updates): the TUF repository the box trusts and fetches from.

    The director (which version to run) is the twin's desired ``model_updates``; this section only says
    where the repository is and how much the box may spend on an update. See docs/UPDATES.md."""

    enabled: bool = Field(default=False, description="run the update agent (needs repository_url and a root)")
    repository_url: str = Field(
        default="", description="base URL of the TUF repository: <url>/metadata/ and <url>/targets/"
    )
    root_file: str | None = Field(
        default=None, description="trusted TUF root.json shipped/provisioned; None = <state_dir>/updates/root.json"
    )
    ca_file: str | None = Field(default=None, description="CA bundle for the repository's TLS; None = system")
    timeout_s: float = Field(default=30.0, gt=0, description="connect and between-bytes timeout per request")
    download_attempts: int = Field(default=5, ge=1, le=100, description="tries per download, each resuming")
    compile_headroom_bytes: int = Field(
        default=512 * 1024**2, ge=0, description="free space needed beyond the bundle (unpack + engine build)"
    )
    retry_s: float = Field(default=300.0, gt=0, description="wait before retrying a repository that was down")
    health_selftest: bool = Field(default=True, description="run the engine self-test in the health gate")
    poll_s: float = Field(default=5.0, gt=0, description="how often waiting updates (window, health gate) look again")


class RetentionConfig(Section):
    days: float = Field(default=7.0, gt=0, description="purge instances/results this long after export")
    check_interval_s: float = Field(default=3600.0, gt=0, description="how often the purge pass runs")
    stalled_days: float = Field(
        default=7.0, gt=0, description="a study revision stuck in received/complete/inferring this long is ended failed"
    )
    undeliverable_days: float = Field(
        default=14.0, gt=0, description="an export still pending this long after it was queued is given up"
    )
    export_alert_hours: float = Field(
        default=24.0, gt=0, description="exports pending longer than this are reported (status, health)"
    )
    orphan_grace_s: float = Field(
        default=86400.0, ge=60, description="files with no database row older than this are deleted (results, spool)"
    )


class ApiConfig(Section):
    """The local web dashboard and JSON API (HTTPS), served inside the daemon (see docs/ARCHITECTURE.md)."""

    enabled: bool = Field(default=True, description="the clinic's dashboard; off = nothing listens")
    bind: str = Field(default="127.0.0.1", description="0.0.0.0 in a clinic so browsers on the LAN can reach it")
    port: int = Field(default=8443, ge=0, le=65535, description="0 = the kernel picks one (tests)")
    tls_cert_file: str | None = Field(
        default=None, description="PEM certificate (chain); None = self-signed, made at first start in secrets/web/"
    )
    tls_key_file: str | None = Field(default=None, description="PEM private key of tls_cert_file")
    session_ttl_s: float = Field(default=1800.0, ge=30, description="a session unused this long ends (idle)")
    session_max_s: float = Field(default=12 * 3600.0, ge=60, description="a session ends this long after login")
    lockout_attempts: int = Field(default=5, ge=1, le=100, description="failed logins in a row that lock a user")
    lockout_s: float = Field(default=900.0, ge=1, description="how long a locked user stays locked")
    ip_max_failures: int = Field(
        default=30, ge=1, description="failed logins per source IP per ip_window_s before it gets 429"
    )
    ip_window_s: float = Field(default=300.0, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="a larger request body gets 413")


class OutcomeCode(Section):
    """One confirmed outcome a radiologist may record on a study (the ``feedback`` message's ``outcome.code``):
    ``code`` (lower-case letters, digits, ``_``), the ``display`` name people see, and whether it confirms the
    target condition (``positive``: a malignant biopsy, MTB detected) or rules it out."""

    code: str = Field(pattern=r"^[a-z0-9_]{1,64}$")
    display: str = Field(min_length=1, max_length=80)
    positive: bool


DEFAULT_OUTCOMES = [
    OutcomeCode(code="biopsy_malignant", display="Biopsy: malignant", positive=True),
    OutcomeCode(code="biopsy_benign", display="Biopsy: benign", positive=False),
    OutcomeCode(code="genexpert_mtb_detected", display="GeneXpert MTB/RIF: MTB detected", positive=True),
    OutcomeCode(code="genexpert_mtb_not_detected", display="GeneXpert MTB/RIF: MTB not detected", positive=False),
    OutcomeCode(code="culture_positive", display="Culture: positive", positive=True),
    OutcomeCode(code="culture_negative", display="Culture: negative", positive=False),
    OutcomeCode(code="followup_abnormal", display="Follow-up: condition confirmed", positive=True),
    OutcomeCode(code="followup_normal", display="Follow-up: no condition found", positive=False),
]


class FeedbackConfig(Section):
    """Radiologists' feedback on the study page (appliance/worklist/feedback.py): the confirmed outcomes they
    may record when known later (biopsy, GeneXpert, culture, follow-up; replace the list for a programme's own)."""

    outcomes: list[OutcomeCode] = Field(
        default_factory=lambda: [o.model_copy() for o in DEFAULT_OUTCOMES], min_length=1, max_length=64
    )
    min_role: Literal["viewer", "technician", "admin"] = Field(
        default="viewer", description="the lowest dashboard role that may give feedback (viewer: radiologists)"
    )

    @field_validator("outcomes")
    @classmethod
    def _unique(cls, v: list[OutcomeCode]) -> list[OutcomeCode]:
        codes = [o.code for o in v]
        dup = sorted({c for c in codes if codes.count(c) > 1})
        if dup:
            raise ValueError(f"outcome codes listed twice: {dup}")
        return v

    def outcome(self, code: str) -> OutcomeCode | None:
        """The outcome with this code, or None."""
        return next((o for o in self.outcomes if o.code == code), None)


class AuditConfig(Section):
    """The audit trail (appliance/core/audit.py): kept for the box's life (no PHI), never purged by retention."""

    source_id: str | None = Field(
        default=None, min_length=1, description="AuditSourceID in DICOM audit messages; None = the host name"
    )
    enterprise_site_id: str | None = Field(
        default=None, min_length=1, description="AuditEnterpriseSiteID in DICOM audit messages (e.g. the clinic)"
    )
    syslog_host: str | None = Field(
        default=None,
        min_length=1,
        description="the hospital's audit repository: entries forwarded as DICOM audit messages, syslog over TLS "
        "(RFC 5425); None = not forwarded",
    )
    syslog_port: int = Field(default=6514, ge=1, le=65535)
    ca_file: Path | None = Field(default=None, description="CA bundle for the repository's certificate; None = system")
    cert_file: Path | None = Field(default=None, description="this box's client certificate (PEM), if required")
    key_file: Path | None = Field(default=None, description="its private key (PEM); None = in cert_file")
    forward_interval_s: float = Field(default=5.0, gt=0, description="how often new entries are forwarded")
    timeout_s: float = Field(default=10.0, gt=0, description="connect/send timeout towards the repository")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> AuditConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not (the client certificate it belongs to)")
        return self


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """Effective configuration of the appliance."""

    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    state_dir: Path = DEFAULT_STATE_DIR
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs).
        return (env_settings, init_settings)

    # Paths inside the one state directory.
    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.state_dir / "results"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` names each offending key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        out.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return out


def config_path_from_env() -> Path:
    return Path(os.environ.get("APPLIANCE_CONFIG", str(DEFAULT_CONFIG_FILE)))


def load_settings(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load the TOML file (if it exists), apply env overrides and ``overrides`` (CLI flags), validate.

    A missing default file is fine (safe defaults); a missing file that was asked for explicitly is not.
    """
    explicit = path is not None or "APPLIANCE_CONFIG" in os.environ
    path = path or config_path_from_env()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    elif explicit:
        raise ConfigError([f"{path}: configuration file not found"])
    try:
        settings = Settings(**data)
        for key, value in (overrides or {}).items():
            setattr(settings, key, value)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from exc
    except SettingsError as exc:  # an APPLIANCE_* variable holding malformed JSON for a section or table
        raise ConfigError([f"environment: {exc} (a section or table variable must hold a JSON object)"]) from exc
    return settings


def _trust_problems(e: EnginesConfig) -> list[str]:
    """Model-trust settings that let anyone with a copy of the public repository sign what the box runs."""
    from engines.errors import TrustError
    from engines.keys import TrustStore
    from engines.reference import publicly_known_key_ids

    out: list[str] = []
    if e.trust_demo_key:
        out.append(
            "engines.trust_demo_key: the demo key's private half is public, anyone can sign models this box runs "
            "(set it false; only `appliance demo` and tests use it)"
        )
    for kid in sorted(set(e.trusted_keys) & publicly_known_key_ids()):
        out.append(f"engines.trusted_keys: {kid} is the demo key, whose private half is public (remove it)")
    if e.install_reference_bundles:
        out.append(
            "engines.install_reference_bundles: the reference bundles are demo models, NOT FOR CLINICAL USE "
            "(set it false)"
        )
    try:
        TrustStore.from_config(e.trusted_keys, e.revoked_keys)
    except TrustError as exc:
        out.append(f"engines.trusted_keys: {exc}")
    return out


def check_problems(settings: Settings) -> list[str]:
    """Problems that are not type errors: things that would fail at run time."""
    problems: list[str] = []
    d = settings.dicom
    if d.allowlist_enabled and not d.allowed_callers:
        problems.append("dicom.allowed_callers: allowlist enabled but empty: every modality would be rejected")
    c = settings.cloud
    for kid, pub in c.keyset_trusted_keys.items():
        try:
            raw = base64.b64decode(pub, validate=True)
            ok = len(raw) == 32 and hashlib.sha256(raw).hexdigest()[:16] == kid
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"cloud.keyset_trusted_keys.{kid}: not the base64 Ed25519 public key with this key id")
    if c.enabled:
        if not c.hub_hostname:
            problems.append("cloud.hub_hostname: required when cloud.enabled")
        if not c.device_id:
            problems.append("cloud.device_id: required when cloud.enabled")
        if not c.recipient_keys:
            problems.append("cloud.recipient_keys: required when cloud.enabled (results are encrypted)")
    problems += _trust_problems(settings.engines)
    a = settings.api
    if a.enabled:
        if (a.tls_cert_file is None) != (a.tls_key_file is None):
            problems.append("api.tls_cert_file, api.tls_key_file: set both or neither (neither = self-signed)")
        for key in ("tls_cert_file", "tls_key_file"):
            value = getattr(a, key)
            if value is not None and not os.access(value, os.R_OK):
                problems.append(f"api.{key}: {value} is not readable")
    names = [dst.name for dst in settings.pipeline.destinations]
    if len(names) != len(set(names)):
        problems.append("pipeline.destinations: destination names must be unique")
    parent = settings.state_dir if settings.state_dir.exists() else settings.state_dir.parent
    if not os.access(parent, os.W_OK):
        problems.append(f"state_dir: {settings.state_dir} is not writable")
    return problems
