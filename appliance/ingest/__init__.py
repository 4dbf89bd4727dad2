"""DICOM receive: the C-ECHO / C-STORE SCP, its spool, and the study assembler."""
