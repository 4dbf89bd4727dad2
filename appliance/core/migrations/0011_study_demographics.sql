-- What the worklist shows of each received instance's patient and study (PS3.3 C.7.1.1 Patient Module, C.7.2.1
-- General Study Module), decoded with its Specific Character Set; written by appliance/ingest/records.py with the
-- instance row and deleted with it by retention (no PHI outlives the instance).
ALTER TABLE instances ADD COLUMN patient_name TEXT;
ALTER TABLE instances ADD COLUMN patient_id TEXT;
ALTER TABLE instances ADD COLUMN accession_number TEXT;
ALTER TABLE instances ADD COLUMN study_date TEXT
