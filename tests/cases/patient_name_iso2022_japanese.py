"""CR chest whose Specific Character Set is the two-valued `\\ISO 2022 IR 87` (first value empty: ASCII by
default, JIS X 0208 by escape sequence) with a three-component Japanese Patient's Name and institution.
Right outcome: SR and SC are written with a character set that encodes the name, and both decode to exactly the
input name, so the PACS files the results under the same patient. Other PS3.5 forms (ISO 2022 with other
languages, multi-valued sets) are the same family."""

import sys

from engines.reference.phantoms import PatientInfo, chest_phantom, to_dicom, write_dicom

ph = chest_phantom(320, 256, seed=1, nodules=1)
ds = to_dicom(
    ph.pixels,
    modality="CR",
    photometric="MONOCHROME2",
    patient_orientation=("L", "F"),
    patient=PatientInfo(name="X", patient_id="C16"),
)
ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
ds.InstitutionName = "山田病院"
write_dicom(ds, sys.argv[1])
