"""What the load tests send and how they judge answers (no server needed)."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from loadtests.targets import (
    Answer,
    AnswerError,
    GatewayTarget,
    LoadTestSettings,
    Payload,
    Reference,
    TorchServeTarget,
    TritonTarget,
    check_answer,
    load_payloads,
    load_references,
    make_target,
    parse_predict_response,
    parse_triton_classification,
    save_references,
)
from training.digits import held_out_indices, split_indices
from training.trainer import TrainConfig

SETTINGS = LoadTestSettings(
    gateway_url="http://127.0.0.1:1", torchserve_token="secret-key", top_k=3
)


def _body(predictions: object, backend: str = "predictor", **extra: object) -> bytes:
    data = {"model": "classifier", "version": "2", "backend": backend, "predictions": predictions}
    return json.dumps(data | extra).encode()


GOOD = [
    {"label": "7", "class_id": 7, "score": 0.9},
    {"label": "1", "class_id": 1, "score": 0.09},
    {"label": "4", "class_id": 4, "score": 0.01},
]


class Headers(dict[str, str]):
    """Case-insensitive like geventhttpclient's and urllib's header objects."""

    def get(self, name: str, default: object = None) -> object:  # type: ignore[override]
        for key, value in self.items():
            if key.lower() == name.lower():
                return value
        return default


# --------------------------------------------------------------------------- payloads


def test_held_out_split_is_the_one_training_holds_out() -> None:
    count = len(load_digits().images)
    config = TrainConfig()  # the split a default training run draws
    _, _, test = split_indices(count, (config.val_fraction, config.test_fraction), config.seed)
    assert held_out_indices(count) == [int(i) for i in test]


def test_payloads_are_pngs_of_held_out_digits_with_their_labels() -> None:
    digits = load_digits()
    payloads = load_payloads(5)
    assert [p.index for p in payloads] == held_out_indices(len(digits.images))[:5]
    for payload in payloads:
        image = Image.open(io.BytesIO(payload.png))
        assert image.format == "PNG" and image.size == (8, 8)
        expected = np.clip(digits.images[payload.index] * 255 / 16, 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(image), expected)
        assert payload.label == digits.target[payload.index]


# --------------------------------------------------------------------------- parsing


def test_parse_predict_response() -> None:
    answer = parse_predict_response(_body(GOOD), top_k=3)
    assert (answer.backend, answer.version, answer.top1) == ("predictor", "2", 7)
    assert answer.margin == pytest.approx(math.log(0.9 / 0.09))  # logit gap of the best two


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (_body(GOOD, backend=None), "'backend'"),  # type: ignore[arg-type]
        (_body([]), "1..3 entries"),
        (_body([*GOOD, GOOD[2]]), "1..3 entries"),
        (_body([GOOD[1], GOOD[0]]), "not sorted"),
        (_body([{"label": "7", "class_id": 7, "score": 1.5}]), "score in [0, 1]"),
        (_body([{"label": "7", "class_id": True, "score": 0.5}]), "class_id"),
        (_body([{"label": 7, "class_id": 7, "score": 0.5}]), "label"),
    ],
)
def test_parse_predict_response_rejects_broken_answers(body: bytes, message: str) -> None:
    with pytest.raises(AnswerError) as info:
        parse_predict_response(body, top_k=3)
    assert message in str(info.value)


def test_gateway_target_checks_status_engine_and_header() -> None:
    target = GatewayTarget(SETTINGS, "torchserve")
    good = target.parse(200, Headers({"x-backend": "torchserve"}), _body(GOOD, "torchserve"))
    assert good.top1 == 7
    with pytest.raises(AnswerError, match=r"HTTP 503: .*no engine"):
        target.parse(503, Headers(), b'{"error": "no engine can answer", "code": "x"}')
    # A failover answer is not the engine being measured.
    with pytest.raises(AnswerError, match="answered by 'predictor', not 'torchserve'"):
        target.parse(200, Headers({"X-Backend": "predictor"}), _body(GOOD, "predictor"))
    with pytest.raises(AnswerError, match="X-Backend header"):
        target.parse(200, Headers(), _body(GOOD, "torchserve"))


def test_gateway_call_follows_the_contract() -> None:
    payload = load_payloads(1)[0]
    call = GatewayTarget(SETTINGS, "triton").call(payload)
    assert call.path == "/predict?backend=triton"
    assert json.loads(call.body) == {"image": payload.b64, "top_k": 3}
    assert call.headers == {"Content-Type": "application/json"}
    keyed = LoadTestSettings(gateway_api_key="k", gateway_api_key_header="X-API-Key")
    assert GatewayTarget(keyed, "triton").call(payload).headers["X-API-Key"] == "k"


def test_torchserve_call_sends_raw_bytes_with_the_inference_key() -> None:
    payload = load_payloads(1)[0]
    call = TorchServeTarget(SETTINGS).call(payload)
    assert call.path == "/predictions/classifier"
    assert call.body == payload.png
    assert call.headers["Authorization"] == "Bearer secret-key"
    assert call.headers["X-Top-K"] == "3"


def test_torchserve_key_is_read_from_the_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "abc"}, "management": {"key": "m"}}))
    settings = LoadTestSettings(torchserve_key_file=key_file)
    assert settings.torchserve_inference_key() == "abc"
    missing = LoadTestSettings(torchserve_key_file=key_file.with_name("nope.json"))
    with pytest.raises(AnswerError, match="is TorchServe up"):
        missing.torchserve_inference_key()


def test_triton_call_is_a_binary_tensor_request() -> None:
    payload = load_payloads(1)[0]
    call = TritonTarget(SETTINGS).call(payload)
    assert call.path == "/v2/models/classifier_ensemble/infer"
    json_size = int(call.headers["Inference-Header-Content-Length"])
    header = json.loads(call.body[:json_size])
    (image,) = header["inputs"]
    assert (image["name"], image["shape"], image["datatype"]) == ("IMAGE", [1, 1], "BYTES")
    tensor = call.body[json_size:]
    assert image["parameters"]["binary_data_size"] == len(tensor)
    assert struct.unpack("<I", tensor[:4]) == (len(payload.png),)
    assert tensor[4:] == payload.png
    (logits,) = header["outputs"]
    assert logits == {"name": "LOGITS", "parameters": {"classification": 3, "binary_data": False}}


def _triton(data: list[object], model: str = "classifier_ensemble") -> bytes:
    output = {"name": "LOGITS", "datatype": "BYTES", "shape": [1, len(data)], "data": data}
    return json.dumps({"model_name": model, "model_version": "1", "outputs": [output]}).encode()


def test_parse_triton_classification() -> None:
    answer = TritonTarget(SETTINGS).parse(200, Headers(), _triton(["9.5:3:3", "7.25:8:8"]))
    assert answer == Answer("triton", "1", 3, 2.25)
    with pytest.raises(AnswerError, match="not 'classifier_ensemble'"):
        parse_triton_classification(_triton(["1:2:2"], model="other"), "classifier_ensemble", 3)
    with pytest.raises(AnswerError, match="score:index"):
        parse_triton_classification(_triton(["oops"]), "classifier_ensemble", 3)
    with pytest.raises(AnswerError, match="not sorted"):
        parse_triton_classification(_triton(["1:2:2", "3:1:1"]), "classifier_ensemble", 3)
    with pytest.raises(AnswerError, match="HTTP 400"):
        TritonTarget(SETTINGS).parse(400, Headers(), b'{"error": "[not_an_image] bad"}')


def test_make_target_names() -> None:
    assert make_target("gateway:triton", SETTINGS).name == "gateway:triton"
    assert make_target("direct:torchserve", SETTINGS).backend == "torchserve"
    with pytest.raises(AnswerError, match="unknown target"):
        make_target("gateway:tensorflow", SETTINGS)


# --------------------------------------------------------------------------- checking


def _reference() -> Reference:
    return Reference("gateway:predictor", "2", {10: 7, 11: 3}, 0, 1.0)


def test_check_answer_accepts_the_idle_answer() -> None:
    payload = Payload(index=10, label=7, png=b"", b64="")
    check_answer(Answer("predictor", "2", 7, 3.0), payload, _reference())


def test_check_answer_rejects_another_class() -> None:
    payload = Payload(index=11, label=3, png=b"", b64="")
    with pytest.raises(AnswerError, match=r"digit #11 \(a 3\): top-1 class 5, .* answered 3"):
        check_answer(Answer("predictor", "2", 5, 3.0), payload, _reference())


def test_check_answer_rejects_another_model_version() -> None:
    payload = Payload(index=10, label=7, png=b"", b64="")
    with pytest.raises(AnswerError, match="new version was published"):
        check_answer(Answer("predictor", "3", 7, 3.0), payload, _reference())


def test_references_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "references.json"
    save_references(path, {"gateway:predictor": _reference()})
    assert load_references(path) == {"gateway:predictor": _reference()}
