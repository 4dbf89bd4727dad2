"""Keys for results come from the central team, signed: the twin can neither supply nor replay recipient keys, only
choose among those of a key set signed by a key the box trusts (and the technician's config keys)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from appliance.cloud import crypto, keysets
from appliance.cloud.agent import CloudAgent
from appliance.cloud.overlay import CloudOverlay
from appliance.cloud.result_messages import CloudResultPublisher
from appliance.core.store import Store
from engines import keys
from testsupport.cloud import DEVICE, cloud_settings, sample_result
from testsupport.common import PYTHON, ROOT, wait_until
from testsupport.fakehub import FakeHub

DAY = 86400


def _keyset(version: int, recipients: dict[str, str], expires_in: float = DAY) -> keysets.KeySet:
    now = int(time.time())
    return keysets.KeySet(version=version, issued_at=now, expires_at=int(now + expires_in), keys=recipients)


@pytest.fixture
def signing():
    key = keys.generate_private_key()
    return key, {keys.key_id(key): keys.public_key_b64(key)}


@pytest.mark.unit
def test_verify_accepts_only_a_trusted_fresh_newer_signature(signing) -> None:
    key, trusted = signing
    _, pub = crypto.generate_keypair()
    _, pub2 = crypto.generate_keypair()
    good = keysets.sign(_keyset(2, {"c-1": pub}), key)
    ks = keysets.verify(good, trusted)
    assert ks.version == 2 and ks.keys == {"c-1": pub}

    other = keys.generate_private_key()
    cases = {
        "unknown_signer": keysets.sign(_keyset(2, {"c-1": pub}), other),
        "bad_signature": {**good, "keyset": good["keyset"].replace(pub, pub2)},  # keys swapped after signing
        "expired": keysets.sign(_keyset(3, {"c-1": pub}, expires_in=-1), key),
        "bad_format": {**good, "signature": None},
    }
    for reason, doc in cases.items():
        with pytest.raises(keysets.KeySetError) as exc:
            keysets.verify(doc, trusted)
        assert exc.value.reason == reason, (reason, str(exc.value))
    # a signer listed under another key's id is not trusted
    with pytest.raises(keysets.KeySetError, match="another key id"):
        keysets.verify(keysets.sign(_keyset(2, {"c-1": pub}), other), {keys.key_id(other): trusted[keys.key_id(key)]})
    newest = (2, keysets.canonical_content(ks))
    with pytest.raises(keysets.KeySetError, match="older"):
        keysets.verify(keysets.sign(_keyset(1, {"c-1": pub}), key), trusted, newest=newest)
    with pytest.raises(keysets.KeySetError, match="other keys"):
        keysets.verify(keysets.sign(_keyset(2, {"c-2": pub2}), key), trusted, newest=newest)
    assert keysets.verify(good, trusted, newest=newest) == ks  # the same set again (each full twin GET)


@pytest.mark.unit
def test_overlay_refuses_replays_across_restarts_and_expired_sets_give_way_to_config_keys(home: Path, signing) -> None:
    from appliance.cloud.twin import validate
    from appliance.core.config import CloudConfig

    key, trusted = signing
    _, cfg_pub = crypto.generate_keypair()
    _, p1 = crypto.generate_keypair()
    _, p2 = crypto.generate_keypair()
    base = CloudConfig(recipient_keys={"config": cfg_pub}, keyset_trusted_keys=trusted)
    store = Store(home / "state.db")
    ov = CloudOverlay(base, store)
    assert dict(ov.current().recipient_keys) == {"config": cfg_pub}
    v3 = keysets.sign(_keyset(3, {"a": p1, "b": p2}), key)
    eff = ov.apply(validate({"recipient_keyset": v3, "recipient_key_ids": ["b"]}), 10)
    assert dict(eff.recipient_keys) == {"b": p2} and eff.keyset_version == 3
    # the twin drops the set: the config file's keys; then tries to bring back an older signed set
    assert dict(ov.apply(validate({}), 11).recipient_keys) == {"config": cfg_pub}
    ov2 = CloudOverlay(base, Store(home / "state.db"))  # after a restart the newest accepted version is remembered
    with pytest.raises(keysets.KeySetError, match="older"):
        ov2.apply(validate({"recipient_keyset": keysets.sign(_keyset(2, {"a": p1}), key)}), 12)
    assert dict(ov2.current().recipient_keys) == {"config": cfg_pub}
    with pytest.raises(ValueError, match="not among the keys in force"):
        ov2.apply(validate({"recipient_key_ids": ["evil"]}), 13)
    # a set that expires while in force: the config keys take over, never the expired ones
    short = keysets.sign(_keyset(4, {"a": p1}, expires_in=1.5), key)
    assert dict(ov2.apply(validate({"recipient_keyset": short}), 14).recipient_keys) == {"a": p1}
    time.sleep(2.0)
    assert dict(ov2.current().recipient_keys) == {"config": cfg_pub}
    assert dict(CloudOverlay(base, Store(home / "state.db")).current().recipient_keys) == {"config": cfg_pub}


@pytest.fixture
def agent_for(home: Path, hub: FakeHub, pki, device_key: str, central_keys, signing):
    agents: list[CloudAgent] = []

    def make() -> CloudAgent:
        s = cloud_settings(home, hub.port, pki, device_key, central_keys["pub"], keyset_trusted_keys=signing[1])
        agents.append(CloudAgent(s))
        return agents[-1]

    yield make
    for a in agents:
        a.stop()


def _applied(agent: CloudAgent, version: int) -> dict:
    wait_until(lambda: agent.twin.status.get("version") == version, timeout=20, what=f"desired {version} decided")
    return agent.twin.status


@pytest.mark.integration
def test_twin_patches_with_raw_unsigned_or_old_keys_are_refused_a_signed_set_is_used(
    agent_for, hub: FakeHub, central_keys, signing
) -> None:
    """Over the fake hub (TLS): an attacker with twin write access tries raw keys, a set signed by their own key,
    a tampered set; each is refused and reported, results stay readable by the central team only. The central
    team's signed set is accepted and used; a replay of an older one after it is refused."""
    key, _ = signing
    agent = agent_for()
    agent.start()
    attacker_priv, attacker_pub = crypto.generate_keypair()
    central_priv2, central_pub2 = crypto.generate_keypair()
    attacker_signing = keys.generate_private_key()
    good_v2 = keysets.sign(_keyset(2, {"central-2": central_pub2}), key)
    tampered = {**good_v2, "keyset": good_v2["keyset"].replace(central_pub2, attacker_pub)}
    refusals = [
        ({"recipient_keys": {"evil": attacker_pub}}, "cannot supply encryption keys"),
        ({"recipient_keyset": keysets.sign(_keyset(9, {"evil": attacker_pub}), attacker_signing)}, "unknown_signer"),
        ({"recipient_keyset": tampered}, "bad_signature"),
        ({"recipient_keyset": keysets.sign(_keyset(9, {"evil": attacker_pub}, expires_in=-5), key)}, "expired"),
        ({"recipient_key_ids": ["evil"]}, "not among the keys in force"),
    ]
    for patch, reason in refusals:
        v = hub.update_desired(DEVICE, patch)
        status = _applied(agent, v)
        assert status["status"] == "rejected" and reason in status["reason"], status
        assert dict(agent.overlay.current().recipient_keys) == {"central-1": central_keys["pub"]}
        hub.update_desired(DEVICE, dict.fromkeys(patch))  # the twin's author removes it again
    wait_until(
        lambda: (hub.twin(DEVICE)["reported"].get("desired_status") or {}).get("status") in ("rejected", "applied"),
        timeout=20,
        what="status reported to the hub",
    )
    publisher = CloudResultPublisher(agent.settings, agent.overlay)
    body = publisher.build(sample_result(1), 1).body
    with pytest.raises(crypto.DecryptError):
        crypto.decrypt(body, {"evil": attacker_priv})
    assert crypto.decrypt(body, {"central-1": central_keys["priv"]})[0]["type"] == "result"

    v = hub.update_desired(DEVICE, {"recipient_keyset": good_v2})
    assert _applied(agent, v)["status"] == "applied"
    assert dict(agent.overlay.current().recipient_keys) == {"central-2": central_pub2}
    body = publisher.build(sample_result(2), 1).body
    assert crypto.decrypt(body, {"central-2": central_priv2})[0]["type"] == "result"

    old = keysets.sign(_keyset(1, {"central-1": central_keys["pub"]}), key)
    v = hub.update_desired(DEVICE, {"recipient_keyset": old})
    status = _applied(agent, v)
    assert status["status"] == "rejected" and "replayed" in status["reason"]
    assert dict(agent.overlay.current().recipient_keys) == {"central-2": central_pub2}


@pytest.mark.integration
def test_central_keyset_cli_signs_what_the_box_accepts(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "appliance", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )

    r = cli("central", "keyset", "keygen", "--out", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    r = cli("central", "keygen", "--out", str(tmp_path / "r"), "--kid", "central-2027")
    assert r.returncode == 0, r.stderr
    r = cli(
        "central", "keyset", "sign", "--key", str(tmp_path / "k" / "keyset-signing.pem"), "--version", "5",
        "--recipient", f"central-2027={tmp_path / 'r' / 'central-2027.pub'}", "--out", str(tmp_path / "set.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "set.json").read_text())
    ks = keysets.verify(doc, {info["key_id"]: info["public_key"]})
    assert ks.version == 5 and ks.keys == {"central-2027": (tmp_path / "r" / "central-2027.pub").read_text().strip()}
    r = cli("central", "keyset", "sign", "--key", str(tmp_path / "k" / "keyset-signing.pem"), "--version", "6",
            "--recipient", "x=bm90LWEta2V5")  # fmt: skip
    assert r.returncode == 2 and "X25519" in r.stderr


@pytest.mark.unit
def test_config_check_flags_a_trusted_keyset_key_under_the_wrong_id(signing) -> None:
    from appliance.core.config import Settings, check_problems

    _, trusted = signing
    ((kid, pub),) = trusted.items()
    assert not [p for p in check_problems(Settings(cloud={"keyset_trusted_keys": trusted})) if "keyset" in p]
    wrong = Settings(cloud={"keyset_trusted_keys": {"0" * 16: pub, kid: "bm90LWEta2V5"}})
    problems = [p for p in check_problems(wrong) if "keyset_trusted_keys" in p]
    assert len(problems) == 2, problems
