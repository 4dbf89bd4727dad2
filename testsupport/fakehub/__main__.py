"""Run the fake IoT Hub + DPS standalone: ``python -m testsupport.fakehub --help``."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from testsupport.fakehub.hub import FakeHub
from testsupport.pki import issue_cert, make_ca


def main() -> None:
    """Serve until Ctrl-C, printing each device-to-cloud message as it arrives."""
    ap = argparse.ArgumentParser(prog="python -m testsupport.fakehub", description=__doc__)
    ap.add_argument("--port", type=int, default=8883)
    ap.add_argument("--hostname", default="fakehub.azure-devices.net", help="the hub name devices put in usernames")
    ap.add_argument("--cert", help="server certificate (PEM); default: generate a test CA + cert")
    ap.add_argument("--key", help="server key (PEM)")
    ap.add_argument("--client-ca", help="CA that signs device certificates (X.509 auth)")
    ap.add_argument("--device", action="append", default=[], metavar="ID:KEY", help="SAS device (repeatable)")
    ap.add_argument("--x509-device", action="append", default=[], metavar="ID", help="X.509 device (CN = ID)")
    ap.add_argument("--id-scope", default="0ne00000001")
    ap.add_argument("--group-key", help="DPS symmetric-key enrollment group key (base64)")
    args = ap.parse_args()
    cert, key, client_ca = args.cert, args.key, args.client_ca
    if not cert:
        d = Path(tempfile.mkdtemp(prefix="fakehub-"))
        ca_key, ca_cert, ca_path = make_ca(d)
        c, k = issue_cert(ca_key, ca_cert, "localhost", d, "server", server=True)
        cert, key, client_ca = str(c), str(k), client_ca or str(ca_path)
        print(f"generated test CA {ca_path} (trust it as cloud.ca_file; it also signs device certs)")
    hub = FakeHub(args.hostname, cert, key, client_ca, port=args.port, id_scope=args.id_scope)
    for spec in args.device:
        dev_id, _, dev_key = spec.partition(":")
        hub.add_device(dev_id, key=dev_key)
    for dev_id in args.x509_device:
        hub.add_device(dev_id, x509=True)
    if args.group_key:
        hub.add_enrollment_group("default", args.group_key)
    port = hub.start()
    print(f"fake IoT Hub {args.hostname} listening on 127.0.0.1:{port} (Ctrl-C to stop)", flush=True)
    print(f"service API (HTTPS): IOTHUB_CONNECTION_STRING='{hub.service_connection_string()}'", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.5)
            msgs = hub.messages()
            for m in msgs[seen:]:
                print(f"D2C {m.device_id} {m.props} {len(m.body)} bytes", flush=True)
            seen = len(msgs)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
