"""What the appliance relies on in its dependencies beyond their plain documented use: the one private
attribute (behind appliance.core.compat) and the public APIs that replaced private ones, each asserted to
behave as used so that a dependency upgrade that changes them fails here, not in the pipeline."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, DigitalMammographyXRayImageStorageForPresentation, generate_uid
from pynetdicom import AllStoragePresentationContexts

from appliance.core.compat import attach_sr_content
from appliance.core.config import DicomConfig
from appliance.core.store import Store
from appliance.ingest.contexts import all_storage_sop_classes, scp_contexts
from appliance.ingest.header import STUDY_UID
from appliance.ingest.scp import StorageSCP
from appliance.ingest.spool import Spool
from testsupport.dcmtk import storescu, storescu_results
from testsupport.dicom import dataset_bytes, write_series
from testsupport.pipeline import make_dataset, synthetic_image


def _report() -> hd.sr.MeasurementReport:
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="t"),
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="study"),
                measurements=[
                    hd.sr.Measurement(
                        name=hd.sr.CodedConcept("T1", "99TEST", "test score"), value=0.5, unit=codes.UCUM.NoUnits
                    )
                ],
            )
        ],
    )


def test_attach_sr_content_replaces_highdicoms_private_tree() -> None:
    """highdicom keeps ``sr.content`` in ``_content`` (no setter): the adapter must still set what
    ``content`` returns, without a copy, and leave the document valid."""
    source = make_dataset(synthetic_image(64, 64, None))
    root = _report()[0]
    stub = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            stub.add(elem)
    stub.ContentSequence = []
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=stub,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
    )
    assert "_content" in vars(sr), "highdicom no longer keeps the typed tree in _SR._content"
    assert isinstance(inspect.getattr_static(sr, "content"), property)
    assert len(sr.content[0].ContentSequence) == 0
    attach_sr_content(sr, root)
    assert sr.content[0] is root, "sr.content must be the attached tree itself, not a copy"
    assert sr.content.is_root and len(sr.ContentSequence) == len(root.ContentSequence) > 0
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    back = hd.sr.Comprehensive3DSR.from_dataset(dcmread(io.BytesIO(buf.getvalue())))
    assert len(back.content[0].ContentSequence) == len(root.ContentSequence)


def test_pydicom_values_and_get_item_stay_raw() -> None:
    """header.py reads elements unconverted through ``Dataset.values()`` / ``get_item(keep_deferred=True)``
    and counts them with ``len``: each must return the raw elements as read (no value conversion)."""
    buf = io.BytesIO()
    make_dataset(synthetic_image(32, 32, None)).save_as(buf, enforce_file_format=True)  # explicit VR LE
    ds = read_dataset(io.BytesIO(dataset_bytes(buf.getvalue())), False, True)
    elems = list(ds.values())
    assert elems and len(ds) == len(elems) and all(isinstance(e, RawDataElement) for e in elems)
    study = ds.get_item(STUDY_UID, keep_deferred=True)
    assert isinstance(study, RawDataElement) and isinstance(study.value, bytes)
    assert ds.get_item(0x00091001, keep_deferred=True) is None  # absent: None, not KeyError
    assert all(isinstance(e, RawDataElement) for e in ds.values()), "reading must not have converted them"


def test_every_storage_class_comes_from_pynetdicoms_public_contexts() -> None:
    classes = all_storage_sop_classes()
    assert len(classes) == len(set(classes)) == len(AllStoragePresentationContexts) > 100
    assert CTImageStorage in classes and DigitalMammographyXRayImageStorageForPresentation in classes
    assert set(classes) <= set(scp_contexts(True)) and not set(classes) <= set(scp_contexts(False))


@pytest.mark.integration
def test_scp_restarts_after_stop(tmp_path: Path) -> None:
    """stop() shuts the flush pool down; start() must make a new one (tracked by the SCP itself, not by
    ThreadPoolExecutor's private ``_shutdown``) and store instances again."""
    scp = StorageSCP(DicomConfig(port=0, min_free_bytes=0), Store(tmp_path / "state.db"), Spool(tmp_path / "spool"))
    files = write_series(tmp_path / "in", 2)
    scp.start()
    try:
        first = storescu_results(storescu(scp.address[1], files[:1]).stdout)
        assert list(first.values()) == ["Success"], first
    finally:
        scp.stop()
    scp.start()
    try:
        second = storescu_results(storescu(scp.address[1], files[1:]).stdout)
        assert list(second.values()) == ["Success"], second
        rows = scp.store.query("SELECT sop_instance_uid FROM instances")
        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
        )
    finally:
        scp.stop()
