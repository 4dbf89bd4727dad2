"""CR chest PA whose Patient Orientation (0020,0020) is missing; with the argument `empty` it is present with
zero length. The CR IOD makes it Type 2, and many CR plates leave it out.
Right outcome: the image is analysed and its SR and SC are written (the SC carries the same, empty orientation);
no traceback offline, no study stuck in a transient state in the daemon."""

import sys

from engines.reference.phantoms import PatientInfo, chest_phantom, to_dicom, write_dicom

ph = chest_phantom(320, 256, seed=1, nodules=1)
ds = to_dicom(
    ph.pixels, modality="CR", photometric="MONOCHROME2", patient=PatientInfo(name="CASE^ORIENT", patient_id="C02")
)
if len(sys.argv) > 2 and sys.argv[2] == "empty":
    ds.PatientOrientation = ""
write_dicom(ds, sys.argv[1])
