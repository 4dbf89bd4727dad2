"""The fake Azure IoT Hub + DPS (MQTT over TLS on 127.0.0.1): :class:`FakeHub`, used as ``with FakeHub(...) as hub``."""

from testsupport.fakehub.hub import FakeHub, Fault

__all__ = ["FakeHub", "Fault"]
