"""End to end with real parts: the box's cloud agent publishes results to the fake IoT Hub over MQTT/TLS, the hub
routes them (Avro, IoT Hub's storage endpoint) into Azurite over HTTPS, and `appliance central ingest --from
<container URL>` (a subprocess) reads them into Parquet with the site dimension from the hub's service API
(twin tags). The rows, read with DuckDB, are checked against what the hub received."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import duckdb
import pytest
from azure.storage.blob import BlobServiceClient

from appliance.central import store_schema
from appliance.cloud import crypto, outbox, payload
from appliance.cloud.agent import CloudAgent
from appliance.cloud.deid import load_or_create_device_secret
from testsupport.azurite import Azurite, azurite_binary
from testsupport.cloud import DEVICE, cloud_settings, sample_result
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.daemon import daemon_env
from testsupport.fakehub import FakeHub
from testsupport.fakehub.routing import StorageEndpoint, container_sink

pytestmark = pytest.mark.integration


@pytest.fixture
def azurite(tmp_path: Path, pki: dict[str, Path]):
    if azurite_binary() is None:
        pytest.fail("azurite-blob not installed: run ./bootstrap.sh test (npm install) or set AZURITE_BLOB")
    with Azurite(tmp_path / "azurite", cert=pki["server_crt"], key=pki["server_key"]) as az:
        yield az


def test_box_to_hub_to_azurite_to_parquet(
    tmp_path: Path, home: Path, hub: FakeHub, azurite: Azurite, pki, device_key: str, central_keys
) -> None:
    service = BlobServiceClient.from_connection_string(azurite.connection_string, connection_verify=str(pki["ca"]))
    container = service.create_container("iothub-results")
    endpoint = StorageEndpoint(container_sink(container), iothub="fakehub", batch_frequency_s=60)
    hub.add_storage_route(endpoint, condition=lambda props: props.get("type") in ("result", "stats", "feedback"))
    hub.set_tags(DEVICE, {"site": "kisumu-1", "region": "western", "health_system": "moh-ke", "setting": "rural"})

    settings = cloud_settings(home, hub.port, pki, device_key, central_keys["pub"])
    agent = CloudAgent(settings)
    secret = load_or_create_device_secret(settings.secrets_dir)
    sent: dict[str, dict] = {}
    with agent.store.transaction() as conn:
        for i in range(1, 6):
            mid, body = payload.build_result_message(
                sample_result(i), settings, secret, recipient_keys=settings.cloud.recipient_keys
            )
            outbox.enqueue(conn, kind="result", message_id=mid, body=body)
            sent[mid] = json.loads(crypto.decrypt(body, {"central-1": central_keys["priv"]})[1])
    try:
        agent.start()
        wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 5, timeout=30, what="5 results at the hub")
        # and a forged one: a connection of DEVICE sending an envelope that names another box
        forged = crypto.encrypt(
            b"{}",
            {"type": "result", "schema": "result/v1", "mid": "x", "device": "box-else"},
            {"central-1": central_keys["pub"]},
        )
        with agent.store.transaction() as conn:
            outbox.enqueue(conn, kind="result", message_id="forged-1", body=forged)
        wait_until(lambda: len(hub.messages(DEVICE, "result")) >= 6, timeout=30, what="the forged message")
    finally:
        agent.stop()
    written = endpoint.flush()
    endpoint.close()
    assert written and all(n.startswith("fakehub/") and n.count("/") == 6 for n in written)
    received = hub.messages(DEVICE, "result")

    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "central-1.key").write_text(central_keys["priv"])
    store = tmp_path / "store"
    env = daemon_env(
        {
            "APPLIANCE_CENTRAL_BLOB_CONNECTION_STRING": azurite.connection_string,
            "APPLIANCE_CENTRAL_BLOB_CA_FILE": str(pki["ca"]),
            "IOTHUB_CONNECTION_STRING": hub.service_connection_string(),
            "APPLIANCE_CENTRAL_CA_FILE": str(pki["ca"]),
        }
    )

    def ingest() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                PYTHON,
                "-m",
                "appliance",
                "central",
                "ingest",
                "--from",
                f"{azurite.blob_endpoint}/iothub-results",
                "--to",
                str(store),
                "--key",
                str(keydir),
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )

    res = ingest()
    assert res.returncode == 1, res.stderr  # the forged message refused, the rest stored
    summary = json.loads(res.stdout)
    assert summary["accepted"] == len(sent) and summary["rejected"] == {"sender_mismatch": 1}
    glob = store_schema.table_glob(store, "results")
    rows = duckdb.sql(
        f"SELECT mid, device, study, modality, bundle, site, region, health_system, setting, epoch_us(enqueued_time)"
        f" FROM read_parquet('{glob}', hive_partitioning=true) ORDER BY mid"
    ).fetchall()
    by_mid = {m.props["$.mid"]: m for m in received}
    assert [r[0] for r in rows] == sorted(sent)
    for mid, device, study, modality, bundle, site, region, hs, setting, t_us in rows:
        assert device == DEVICE and study == sent[mid]["study_uid"] and modality == sent[mid]["modality"] == "MG"
        assert bundle == "ref-mmg@1.0.0" and (site, region, hs, setting) == ("kisumu-1", "western", "moh-ke", "rural")
        assert abs(t_us / 1e6 - by_mid[mid].received_at) < 1e-3  # the hub's enqueued time, kept
    n_find = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{store_schema.table_glob(store, 'findings')}', hive_partitioning=true)"
    ).fetchall()[0]
    assert n_find == (sum(len(v["findings"]) for v in sent.values()),)
    rejects = [json.loads(x) for x in Path(summary["rejects_file"]).read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["sender_mismatch"]
    assert rejects[0]["source"].startswith("iothub-results/fakehub/")

    again = ingest()  # re-running on the same container adds nothing
    assert json.loads(again.stdout)["accepted"] == 0 and json.loads(again.stdout)["duplicates"] == len(sent)
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0] == (len(sent),)
