"""FastAPI predictor: TorchScript / ONNX Runtime engines, dynamic batching, hot reload,
``POST /predict`` and the Open Inference Protocol v2. Run it with ``python -m services.predictor``.
"""

SERVER_NAME = "predictor"
SERVER_VERSION = "0.1.0"
