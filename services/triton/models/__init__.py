"""Triton python-backend models, copied as ``model.py`` into the generated repositories."""
