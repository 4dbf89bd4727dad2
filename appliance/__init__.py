"""Clinic AI appliance: the daemon, its CLI and everything between DICOM in and results out."""

__version__ = "0.2.0"
