"""Calls made with the KServe SDK's own clients, run inside the SDK's virtual environment.

``kserve``'s pins conflict with this project's (``psutil<6``, ``python-dateutil<3``), so the
tests run this file with the interpreter of a virtual environment of its own
(:mod:`tests.clients.kserve_venv`). It imports nothing of this project: it reads a JSON list of
calls on stdin, makes each with ``kserve.InferenceRESTClient`` (protocol v2) or
``kserve.InferenceGRPCClient``, and writes one JSON answer per call on stdout:

* a call: ``{"transport": "rest" | "grpc", "url": ..., "model": ..., "version": "",
  "request_id": ..., "input": {"name", "datatype", "shape", "npy" | "files"}, "output": name}``
  where ``npy`` is a file holding the tensor and ``files`` lists one file per BYTES element;
* an answer: ``{"ok": true, "id", "model_name", "outputs": {name: {"datatype", "shape",
  "argmax"}}}`` or ``{"ok": false, "status": 400 | "INVALID_ARGUMENT" | ..., "message"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request_of(call: dict[str, Any]) -> InferRequest:
    spec = call["input"]
    if "npy" in spec:
        array = np.load(spec["npy"])
    else:
        array = np.array([[Path(f).read_bytes()] for f in spec["files"]], dtype=np.object_)
    tensor = InferInput(spec["name"], list(spec.get("shape") or array.shape), spec["datatype"])
    # binary_data: raw bytes (REST's binary extension, gRPC's raw contents); a PNG is no text.
    tensor.set_data_from_numpy(array, binary_data=True)
    return InferRequest(
        model_name=call["model"],
        infer_inputs=[tensor],
        request_id=call["request_id"],
        model_version=call.get("version") or None,
    )


def answer_of(response: Any) -> dict[str, Any]:
    outputs = {}
    for output in response.outputs:
        values = output.as_numpy()
        outputs[output.name] = {
            "datatype": output.datatype,
            "shape": list(output.shape),
            "argmax": values.argmax(axis=1).tolist() if output.datatype != "BYTES" else None,
        }
    return {"ok": True, "id": response.id, "model_name": response.model_name, "outputs": outputs}


async def make(call: dict[str, Any]) -> dict[str, Any]:
    request = request_of(call)
    try:
        if call["transport"] == "rest":
            rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
            try:
                response = await rest.infer(call["url"], request, model_name=call["model"])
            finally:
                await rest.close()
        else:
            client = InferenceGRPCClient(call["url"], retries=0, timeout=60)
            try:
                response = await client.infer(request)
            finally:
                await client.close()
    except httpx.HTTPStatusError as exc:
        return {"ok": False, "status": exc.response.status_code, "message": str(exc)}
    except grpc.aio.AioRpcError as exc:
        return {"ok": False, "status": exc.code().name, "message": exc.details()}
    return answer_of(response)


async def main() -> None:
    calls = json.load(sys.stdin)
    answers = [await make(call) for call in calls]
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
