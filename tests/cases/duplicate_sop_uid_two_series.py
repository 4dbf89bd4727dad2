"""One chest study with two DX images in two series that share one SOP Instance UID but differ in pixels (the
first shows a nodule, the second is normal), as after a re-take on a modality that re-used the UID.
Writes two files into the folder given as argument.
Right outcome: both images are analysed and their results stay distinct (distinct output UIDs and files), or the
conflict is reported plainly in the result; never a crash, never one result silently replacing the other."""

import sys
from pathlib import Path

from engines.reference.phantoms import PatientInfo, chest_phantom, synthetic_uid, to_dicom, write_dicom

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
study, sop = synthetic_uid("case20-study"), synthetic_uid("case20-sop")
for i, nodules in enumerate((1, 0)):
    ph = chest_phantom(320, 256, seed=1 + i, nodules=nodules)
    ds = to_dicom(
        ph.pixels,
        modality="DX",
        photometric="MONOCHROME2",
        patient_orientation=("L", "F"),
        study_uid=study,
        series_uid=synthetic_uid("case20-series", i),
        sop_uid=sop,
        series_number=i + 1,
        patient=PatientInfo(name="CASE^DUPUID", patient_id="C20"),
    )
    write_dicom(ds, out / f"series{i + 1}.dcm")
