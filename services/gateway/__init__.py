"""The gateway: one ``POST /predict`` in front of the predictor, TorchServe and Triton."""
