"""The dashboard's TLS certificate: the provisioned one from config, or a self-signed one made at first start.

The self-signed certificate (ECDSA P-256, 10 years, subjectAltName = the host name, ``localhost``, 127.0.0.1
and the bind address when it is a specific IP) lives in ``<state_dir>/secrets/web/`` (``cert.pem`` 0644,
``key.pem`` 0600) and is reused on every later start, so a browser that accepted it once keeps trusting it.
Its SHA-256 fingerprint is logged and shown by ``appliance status`` so the technician can compare it with what
the browser shows.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.core.config import Settings
from appliance.core.logs import get_logger
from durable import write_atomic

log = get_logger(__name__)

VALIDITY_DAYS = 3650


def web_secrets_dir(settings: Settings) -> Path:
    """``<state_dir>/secrets/web``: where the self-signed certificate and its key live."""
    return settings.secrets_dir / "web"


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, as browsers show it (``AB:CD:...``)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _self_signed(bind: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname() or "appliance"
    names: list[x509.GeneralName] = [x509.DNSName(host), x509.DNSName("localhost")]
    ips = {"127.0.0.1", "::1"}
    try:
        if not ipaddress.ip_address(bind).is_unspecified:
            ips.add(bind)
    except ValueError:
        names.append(x509.DNSName(bind))
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, host), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "appliance")]
    )
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificate_files(settings: Settings) -> tuple[Path, Path, bool]:
    """(certificate, key, self_signed): the configured pair, else the self-signed pair (made now if absent).

    Raises OSError when a configured file cannot be read.
    """
    api = settings.api
    if api.tls_cert_file and api.tls_key_file:
        cert, key = Path(api.tls_cert_file), Path(api.tls_key_file)
        cert.read_bytes(), key.read_bytes()  # unreadable -> OSError now, not in the server thread
        return cert, key, False
    d = web_secrets_dir(settings)
    cert, key = d / "cert.pem", d / "key.pem"
    if not (cert.exists() and key.exists()):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        cert_pem, key_pem = _self_signed(api.bind)
        write_atomic(key, key_pem, mode=0o600)
        write_atomic(cert, cert_pem, mode=0o644)
        log.info("self-signed web certificate made", path=str(cert), sha256=fingerprint(cert_pem))
    return cert, key, True
