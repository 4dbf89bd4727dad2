"""Shared helpers for the cloud tests: sample results full of PHI, TLS certificates, settings."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PHI_STRINGS = [
    "DOE^JANE^Q",
    "PID-7781234",
    "ACC-99887766",
    "19610315",
    "20240507",
    "St. Elsewhere Rural Clinic",
    "1.2.826.0.1.3680043.8.498.1001",  # the real study UID
    "1.2.826.0.1.3680043.8.498.2001",  # SOP instance UIDs
    "1.2.826.0.1.3680043.8.498.3001",  # series UID
    "SECRET-IN-EXTRA-KEY",
]


def sample_result(i: int = 0) -> dict[str, Any]:
    """A pipeline result as the pipeline issue describes it, with PHI everywhere PHI can be."""
    study = f"1.2.826.0.1.3680043.8.498.1001{'.' + str(i) if i else ''}"
    sops = [f"1.2.826.0.1.3680043.8.498.2001.{k}{'.' + str(i) if i else ''}" for k in range(2)]
    return {
        "study_uid": study,
        "accession_number": "ACC-99887766",
        "patient": {"name": "DOE^JANE^Q", "id": "PID-7781234", "birth_date": "19610315", "sex": "F"},
        "study_date": "20240507",
        "modality": "MG",
        "institution": "St. Elsewhere Rural Clinic",
        "bundle_id": "ref-mmg",
        "bundle_version": "1.0.0",
        "task": "mmg",
        "findings": [
            {
                "label": "mass",
                "score": 0.91,
                "positive": True,
                "image_sop_uid": sops[0],
                "location": {"row": 120, "col": 88},
            },
            {"label": "mass", "score": 0.12, "positive": False, "image_sop_uid": sops[1], "location": None},
        ],
        "study_score": 0.91,
        "per_breast": {"L": 0.91, "R": 0.12},
        "images": [
            {
                "sop_instance_uid": sops[k],
                "series_uid": "1.2.826.0.1.3680043.8.498.3001",
                "rows": 4096,
                "columns": 3328,
                "view": "CC" if k == 0 else "MLO",
                "laterality": "L" if k == 0 else "R",
            }
            for k in range(2)
        ],
        "created": "2024-05-07T10:11:12Z",
        # PHI in places the schema does not know: must never leave
        "operator_note": "SECRET-IN-EXTRA-KEY DOE^JANE^Q",
        "extra": {"nested": ["PID-7781234"]},
    }


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(dirpath: Path) -> tuple[Any, Any, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = dirpath / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def issue_cert(ca_key: Any, ca_cert: Any, cn: str, out_dir: Path, stem: str, server: bool) -> tuple[Path, Path]:
    """Leaf certificate signed by the test CA; server certs cover localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = b.sign(ca_key, hashes.SHA256())
    crt, key_path = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return crt, key_path
