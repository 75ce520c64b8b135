"""Triton engine: configs generated from the manifest, python-backend models, local launcher."""
