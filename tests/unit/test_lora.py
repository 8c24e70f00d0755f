"""Adapter keys: parsed from peft's names, stable on the wire."""

from __future__ import annotations

import pytest

from fedlora.lora import AdapterKey, Role


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight",
            AdapterKey("bert.encoder.layer.0.attention.self.query", Role.A),
        ),
        (
            "base_model.model.bert.encoder.layer.5.attention.self.value.lora_B.default.weight",
            AdapterKey("bert.encoder.layer.5.attention.self.value", Role.B),
        ),
        ("base_model.model.classifier.modules_to_save.default.bias", AdapterKey("classifier", Role.DENSE, "bias")),
        ("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight", None),
        ("base_model.model.classifier.original_module.weight", None),
        ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.other.weight", None),
    ],
)
def test_keys_are_parsed_from_peft_names(name: str, expected: AdapterKey | None) -> None:
    assert AdapterKey.from_peft_name(name) == expected


def test_wire_form_round_trips() -> None:
    key = AdapterKey("bert.encoder.layer.0.attention.self.query", Role.B)
    assert AdapterKey.parse(str(key)) == key
    with pytest.raises(ValueError):
        AdapterKey.parse("bert.encoder.layer.0.lora_B")
