"""The box's model-update agent: reconciles to the twin's director, verifies through TUF, compiles, proves, switches."""
