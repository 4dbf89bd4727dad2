"""Cloud sync with Azure IoT Hub over MQTT: offline-first outbox, twin, direct methods, end-to-end encryption.

See docs/CLOUD.md. Modules: ``sas`` (tokens), ``client`` (MQTT connection), ``outbox`` (durable queue),
``twin``, ``methods``, ``crypto`` (envelope encryption), ``deid`` + ``payload`` (what leaves the box),
``agent`` (the daemon service tying them together).
"""
