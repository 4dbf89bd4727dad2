"""Which SOP classes and transfer syntaxes the SCP accepts.

Modalities must never be refused for their transfer syntax, so every syntax pynetdicom knows is accepted
(uncompressed LE/BE, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE, video):
the bytes are stored as received, never transcoded. The SOP class UIDs come from pydicom's named
constants, the transfer syntax tables from pynetdicom (still the SCU
library for export); the acceptor itself is ``ul.server``.
"""

from __future__ import annotations

from pydicom import uid
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    VerificationPresentationContexts,
)

VERIFICATION_SOP_CLASS = str(VerificationPresentationContexts[0].abstract_syntax)  # PS3.4 A.4

# The imaging classes the box exists for (CR, DX, MG, CT, SC), their close relatives a clinic's X-ray,
# mammography and CT machines also emit, and the CT dose report most CT scanners send with each study.
IMAGING_SOP_CLASSES: tuple[str, ...] = (
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
    uid.DigitalMammographyXRayImageStorageForPresentation,
    uid.DigitalMammographyXRayImageStorageForProcessing,
    uid.DigitalIntraOralXRayImageStorageForPresentation,
    uid.DigitalIntraOralXRayImageStorageForProcessing,
    uid.BreastTomosynthesisImageStorage,
    uid.BreastProjectionXRayImageStorageForPresentation,
    uid.BreastProjectionXRayImageStorageForProcessing,
    uid.CTImageStorage,
    uid.EnhancedCTImageStorage,
    uid.SecondaryCaptureImageStorage,
    uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    uid.XRayRadiationDoseSRStorage,
)


# Preference when one presentation context offers several syntaxes (the acceptor's order decides):
# explicit VR little endian, explicit big endian, implicit, as dcmtk's storescp does, then every other
# syntax. A modality that proposes its compressed syntax in a context of its own gets it accepted as is.
_FIRST = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2")
TRANSFER_SYNTAXES: tuple[str, ...] = _FIRST + tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES if str(ts) not in _FIRST)


def all_storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class pynetdicom knows (used when ``dicom.accept_all_storage`` is on)."""
    return tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


def scp_contexts(accept_all_storage: bool) -> dict[str, tuple[str, ...]]:
    """Abstract syntax -> transfer syntaxes in preference order: Verification plus storage."""
    classes = all_storage_sop_classes() if accept_all_storage else IMAGING_SOP_CLASSES
    contexts: dict[str, tuple[str, ...]] = {str(VERIFICATION_SOP_CLASS): tuple(map(str, DEFAULT_TRANSFER_SYNTAXES))}
    for sop in classes:
        contexts.setdefault(str(sop), TRANSFER_SYNTAXES)
    return contexts
