"""The cloud side of tests: a PKI for the fake hub, settings pointing an agent at it, sample results full of PHI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from appliance.core.config import Settings
from testsupport.pki import issue_cert, make_ca

HUB = "fakehub.azure-devices.net"
DEVICE = "clinic-0042"


def make_pki(directory: Path) -> dict[str, Path]:
    """A test CA in ``directory`` with a server certificate (localhost, 127.0.0.1), one for the device
    ``DEVICE`` and one for another client ("someone-else"): paths under keys ``ca``, ``server_crt``,
    ``server_key``, ``device_crt``, ``device_key``, ``other_crt``, ``other_key`` and ``dir``."""
    ca_key, ca_cert, ca = make_ca(directory)
    srv_crt, srv_key = issue_cert(ca_key, ca_cert, "localhost", directory, "server", server=True)
    dev_crt, dev_key = issue_cert(ca_key, ca_cert, DEVICE, directory, "device", server=False)
    other_crt, other_key = issue_cert(ca_key, ca_cert, "someone-else", directory, "other", server=False)
    return {
        "ca": ca,
        "server_crt": srv_crt,
        "server_key": srv_key,
        "device_crt": dev_crt,
        "device_key": dev_key,
        "other_crt": other_crt,
        "other_key": other_key,
        "dir": directory,
    }


def cloud_settings(home: Path, port: int, pki: dict[str, Path], key: str, pub: str, **cloud: Any) -> Settings:
    """Settings for an agent of device ``DEVICE`` talking to a hub on 127.0.0.1:``port`` (X.509 from ``pki``,
    SAS ``key`` written to ``home/secrets``), results encrypted to ``pub``; ``cloud`` overrides keys of
    ``[cloud]``. Short backoffs so reconnect tests run in seconds."""
    secrets = home / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "device_key").write_text(key)
    base = {
        "enabled": True,
        "hub_hostname": HUB,
        "connect_host": "127.0.0.1",
        "device_id": DEVICE,
        "port": port,
        "ca_file": str(pki["ca"]),
        "cert_file": str(pki["device_crt"]),
        "key_file": str(pki["device_key"]),
        "recipient_keys": {"central-1": pub},
        "backoff_min_s": 0.2,
        "backoff_max_s": 1.0,
        "backoff_jitter_s": 0.2,
        "keepalive_s": 30,
        "health_interval_s": 3600,
    }
    base.update(cloud)
    return Settings(state_dir=home, cloud=base)


def cloud_env(home: Path, port: int, pki: dict[str, Path], key: str, pub: str, **cloud: Any) -> dict[str, str]:
    """The same settings as APPLIANCE_* environment variables, for a subprocess."""
    s = cloud_settings(home, port, pki, key, pub, **cloud)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_STATE_DIR"] = str(home)
    for k, v in s.cloud.model_dump().items():
        if v is None:
            continue
        env[f"APPLIANCE_CLOUD__{k.upper()}"] = json.dumps(v) if isinstance(v, (dict, list, bool)) else str(v)
    return env


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
                "side": "L",  # the breast (postprocess.finding_side): not PHI, kept
                "locations": [{"row": 120, "col": 88, "side": "L"}],
            },
            {
                "label": "mass",
                "score": 0.12,
                "positive": False,
                "image_sop_uid": sops[1],
                "location": None,
                "side": "R",
                "locations": [],
            },
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
