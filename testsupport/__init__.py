"""Launchers and test data shared by ``tests/`` and ``bench/``; not shipped (not in pyproject's packages).

Each launcher starts its process on 127.0.0.1 with an ephemeral port and stops it on exit:

- :mod:`testsupport.dcmtk`: dcmtk ``storescu`` / ``echoscu`` runs and a ``storescp`` receiver
- :mod:`testsupport.orthanc`: a real Orthanc as the clinic PACS
- :mod:`testsupport.mosquitto`: a real Mosquitto broker with TLS client certificates
- :mod:`testsupport.daemon`: the appliance daemon (``python -m appliance --home H run``)
- :mod:`testsupport.fakehub`: the fake Azure IoT Hub + DPS (``python -m testsupport.fakehub``)

:mod:`testsupport.guard` keeps unmarked (unit) tests in process.

Test data: :mod:`testsupport.dicom` (synthetic instances and series), :mod:`testsupport.phantoms` (phantom
studies ``engines.reference.phantoms`` does not write), :mod:`testsupport.pipeline` and
:mod:`testsupport.bundles` (tiny real ONNX models, manifests, signed bundles), :mod:`testsupport.pki` (a test
CA and certificates), :mod:`testsupport.cloud` (settings for the fake hub, sample results full of PHI).
Common helpers (paths, ports, polling) are in :mod:`testsupport.common`.

pytest fixtures built on these live in ``tests/conftest.py``.
"""
