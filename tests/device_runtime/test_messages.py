"""The JSON wire messages: every one round-trips through JSON, a malformed one is a clear
error, and the server's OpenAPI schema serves the same routes and message fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedmobillm.device_runtime import messages
from fedmobillm.device_runtime.messages import (
    ROUTES,
    Ack,
    AnchorShare,
    DeviceFlag,
    DeviceInfo,
    DeviceState,
    ErrorBody,
    Message,
    MessageError,
    PersonalManifest,
    PrivacyDeclaration,
    RegisterRequest,
    RegisterResponse,
    Revoked,
    RevokeRequest,
    SampleCounts,
)

COUNTS = SampleCounts(train=12, validation=3, anchor=1)
PRIVACY = PrivacyDeclaration("gaussian-rdp", 8.0, 1e-5, 2.0, 0.64, label_epsilon=1.0)
EXAMPLES: list[Message] = [
    RegisterRequest("phone-a", {"format_version": 1, "taps": [2, 4]}, ["neg", "pos"]),
    RegisterRequest("phone-b", {"taps": [2]}, ["neg", "pos"], privacy=PRIVACY),
    PRIVACY,
    RegisterResponse("dev-1", "secret", "bert/tiny/d16/L4/taps2,4", "ab" * 32),
    COUNTS,
    Ack("b1", samples=10, split="train", duplicate=False, device_samples=COUNTS, skipped=2),
    DeviceState("dev-1", "phone-a", "bert/tiny", "ab" * 32, COUNTS, 2, ["k1", "k2"]),
    AnchorShare("cd" * 32, total=100, ids=[3, 7], texts=["a text", "another"]),
    ErrorBody("no such device", hint="register first"),
    ErrorBody("no hint"),
    DeviceFlag("dev-1", "phone-a", "bert/tiny", 3, "int8 scales are not ...", 1.7e9),
    DeviceFlag("dev-2", "phone-b", "bert/tiny", 1, "fp16 activations of tap 0 reach ..."),
    DeviceInfo("dev-1", "phone-a", "bert/tiny", COUNTS, 1.7e9, 1.71e9, False, 1.72e9, True),
    DeviceInfo("dev-2", "phone-b", "bert/tiny", COUNTS, 1.7e9),
    DeviceInfo("dev-3", "phone-c", "bert/tiny", COUNTS, 1.7e9, privacy=PRIVACY),
    RevokeRequest(delete_data=True),
    Revoked("dev-1", revoked=1.72e9, deleted_samples=15),
    PersonalManifest(
        format_version=1,
        architecture="bert/tiny",
        taps=[2, 4],
        hidden_size=16,
        label_names=["neg", "pos"],
        num_labels=2,
        bundle_sha256s=["ab" * 32],
        trainer_step=40,
        inputs=[{"name": "activations", "dtype": "float32", "shape": ["batch", 2, 16]}],
        onnx_max_abs_diff=1e-6,
        weights="int8",
        files={"personal.onnx": {"sha256": "ef" * 32, "bytes": 1234}},
    ),
]


def test_examples_cover_every_message():
    defined = {
        obj
        for obj in vars(messages).values()
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    }
    assert defined == {type(m) for m in EXAMPLES}


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_json(message):
    """to_dict -> JSON text -> from_dict gives the same message back."""
    text = json.dumps(message.to_dict())

    back = type(message).from_dict(json.loads(text))

    assert back == message


def test_defaults_fill_missing_optional_fields_and_unknown_keys_are_ignored():
    data = {"batch_id": "b", "samples": 1, "split": "train", "duplicate": True, "new": 1}
    data["device_samples"] = {"train": 1, "validation": 0}

    ack = Ack.from_dict(data)

    assert ack.skipped == 0 and ack.device_samples == SampleCounts(1, 0, 0)


@pytest.mark.parametrize(
    ("cls", "data", "says"),
    [
        (RegisterResponse, ["not", "an", "object"], "RegisterResponse: expected a JSON object"),
        (RegisterResponse, {"device_id": "d", "token": "t"}, "missing architecture"),
        (
            RegisterResponse,
            {"device_id": "d", "token": 5, "architecture": "a", "bundle_sha256": "s"},
            "RegisterResponse.token: expected a string, got int",
        ),
        (
            Ack,
            {
                "batch_id": "b",
                "samples": 1,
                "split": "train",
                "duplicate": "no",
                "device_samples": {"train": 1, "validation": 0},
            },
            "Ack.duplicate: expected true or false",
        ),
        (
            Ack,
            {
                "batch_id": "b",
                "samples": 1,
                "split": "train",
                "duplicate": False,
                "device_samples": {"train": "1", "validation": 0},
            },
            "Ack.device_samples.train: expected an integer, got str",
        ),
        (SampleCounts, {"train": True, "validation": 0}, "SampleCounts.train: expected an integer"),
        (
            AnchorShare,
            {"anchor_set": "s", "total": 2, "ids": [0, "1"], "texts": ["a", "b"]},
            "AnchorShare.ids[1]: expected an integer",
        ),
        (ErrorBody, {"detail": ["a", "list"]}, "ErrorBody.detail: expected a string"),
        (
            PersonalManifest,
            {"format_version": 1, "architecture": "a", "taps": [1], "hidden_size": 8},
            "missing label_names",
        ),
    ],
)
def test_malformed_message_is_a_clear_error(cls, data, says):
    with pytest.raises(MessageError) as err:
        cls.from_dict(data)

    assert says in err.value.message
    assert "protocol version" in (err.value.hint or "")


def test_device_route():
    assert messages.device_route("d-1") == "/v1/devices/d-1"


def test_openapi_schema_has_the_routes_and_messages(tmp_path):
    """The server serves every route constant, and its schemas are the shared messages."""
    pytest.importorskip("fastapi")
    from fedmobillm.server.app import create_app
    from fedmobillm.server.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, admin_token="a" * 32, train=False)

    schema = create_app(settings).openapi()

    assert set(ROUTES) <= set(schema["paths"])
    components = schema["components"]["schemas"]
    shared = (RegisterRequest, RegisterResponse, SampleCounts, Ack, DeviceState, AnchorShare)
    for cls in (*shared, DeviceInfo, RevokeRequest, Revoked):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(components[cls.__name__]["properties"]) == fields, cls.__name__
    assert set(components["ErrorBody"]["properties"]) == {"detail", "hint"}
