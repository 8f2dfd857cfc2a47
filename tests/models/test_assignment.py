import os

import pytest
import timm
import yaml

from models.assignment import Assignment
from models.errors import AssignmentError, ModelError


def test_vit_layer_names_and_choices(vit_digits):
    layers = Assignment.layers(vit_digits())
    expected = []
    for i in range(4):
        expected += [f"blocks.{i}.attn", f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1",
                     f"blocks.{i}.mlp.fc2"]
    assert sorted(layers) == sorted(expected)
    assert layers["blocks.0.attn"] == ("msa", "hamming")
    assert layers["blocks.3.mlp.fc2"] == ("mult", "shift", "moe")


def test_pvt_layer_names():
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10)
    layers = Assignment.layers(model)
    assert len([n for n, c in layers.items() if c == ("msa", "hamming")]) == 8  # depths [2, 2, 2, 2]
    for suffix in ("attn", "attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert f"stages.3.blocks.1.{suffix}" in layers
    assert all(model.get_submodule(name) is not None for name in layers)


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(ModelError, match="supported are timm VisionTransformer"):
        Assignment.layers(timm.create_model("resnet18", pretrained=False, num_classes=2))


def test_uniform_covers_every_layer(vit_digits):
    model = vit_digits(depth=2)
    a = Assignment.uniform(model, attention="hamming", linear="moe")
    assert set(a.attention) == {"blocks.0.attn", "blocks.1.attn"}
    assert set(a.linear.values()) == {"moe"} and len(a.linear) == 8
    assert a.counts() == {"hamming": 2, "moe": 8}
    a.validate(model)


def test_invalid_choices_and_unknown_layers_list_the_valid_ones(vit_digits):
    with pytest.raises(AssignmentError, match="valid choices: mult, shift, moe"):
        Assignment(linear={"blocks.0.mlp.fc1": "int8"})
    with pytest.raises(AssignmentError, match="valid choices: msa, hamming"):
        Assignment(attention={"blocks.0.attn": "softmax"})
    model = vit_digits(depth=2)
    with pytest.raises(AssignmentError, match=r"blocks\.7\.attn.*valid attention layers: blocks\.0\.attn, blocks\.1\.attn"):
        Assignment(attention={"blocks.7.attn": "hamming"}).validate(model)
    with pytest.raises(AssignmentError, match=r"valid linear layers: blocks\.0\.attn\.qkv"):
        Assignment(linear={"blocks.0.attn": "shift"}).validate(model)


def test_capacity_must_name_moe_layers_with_a_share():
    Assignment(linear={"a": "moe"}, capacity={"a": 0.25})
    with pytest.raises(AssignmentError, match="not assigned 'moe'"):
        Assignment(linear={"a": "shift"}, capacity={"a": 0.25})
    with pytest.raises(AssignmentError, match=r"\[0, 1\]"):
        Assignment(linear={"a": "moe"}, capacity={"a": 1.5})


def test_yaml_round_trip_is_atomic(tmp_path, vit_digits):
    model = vit_digits(depth=2)
    a = Assignment.uniform(model, attention="hamming", linear="shift")
    a.linear["blocks.1.mlp.fc2"] = "moe"
    a.capacity["blocks.1.mlp.fc2"] = 0.3
    path = a.to_yaml(tmp_path / "sub" / "assignment.yaml")
    assert os.listdir(tmp_path / "sub") == ["assignment.yaml"]  # no temporary file left behind
    assert yaml.safe_load(path.read_text())["linear"]["blocks.1.mlp.fc2"] == "moe"
    back = Assignment.from_yaml(path)
    assert back == a
    assert Assignment.from_dict(a.to_dict()) == a


def test_bad_files_and_dicts(tmp_path):
    with pytest.raises(AssignmentError, match="cannot read assignment file"):
        Assignment.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention: [unclosed\n")
    with pytest.raises(AssignmentError, match="not valid YAML"):
        Assignment.from_yaml(bad)
    with pytest.raises(AssignmentError, match="unknown assignment key.*valid keys: attention, linear, capacity"):
        Assignment.from_dict({"attn": {}})
    with pytest.raises(AssignmentError, match="mapping"):
        Assignment.from_dict(["blocks.0.attn"])
    assert Assignment.from_dict({}) == Assignment()


def test_is_dense_only_when_no_layer_leaves_msa_or_mult(vit_digits):
    vit_digits = vit_digits()
    assert Assignment.uniform(vit_digits).is_dense()
    assert Assignment().is_dense()  # a layer it does not name keeps its dense form
    assert not Assignment.uniform(vit_digits, linear="moe").is_dense()
    assert not Assignment(attention={"blocks.0.attn": "hamming"}).is_dense()
