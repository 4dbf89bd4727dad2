"""Four-view screening mammogram (mass in the left breast) in which View Position (0018,5101) is absent: the view
is given only by View Code Sequence (0054,0220), which the MG IOD requires (View Position is optional).
Writes four files into the folder given as argument.
Right outcome: the study is routed to the mammography model from the coded view and laterality, and the mass is
found on the left. Other coded attributes (anatomy, view modifiers) are the same family."""

import shutil
import sys
from pathlib import Path

import pydicom

from engines.reference.phantoms import PatientInfo, mammo_study

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
tmp = out / "_gen"
st = mammo_study(tmp, seed=1, masses={"L": 1}, patient=PatientInfo(name="CASE^VIEWCODE", patient_id="C17"))
for f in st["files"]:
    ds = pydicom.dcmread(f)
    del ds.ViewPosition
    ds.save_as(out / Path(f).name, enforce_file_format=True)
shutil.rmtree(tmp)
