"""Training, export and publishing of image classifiers (``python -m training --help``)."""
