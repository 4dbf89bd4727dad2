"""Device identity, DPS registration and the technician's tools."""
