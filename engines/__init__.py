"""Model bundles and inference backends. Imports nothing else of the project."""
