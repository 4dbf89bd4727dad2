"""A lean DICOM Upper Layer (PS3.8) acceptor: just what the box's C-ECHO / C-STORE SCP needs.

``pdu`` encodes and decodes the association PDUs, ``dimse`` the command sets, ``server`` runs one
thread per association. pynetdicom stays for the SCU side (export); this replaces its acceptor, whose
per-message machinery cost more than the whole durable store of an instance.
"""
