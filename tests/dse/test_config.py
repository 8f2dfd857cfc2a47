from pathlib import Path

import pytest
import yaml

from dse.config import Config, config_from_dict, config_to_dict, load_config, save_config
from dse.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_roundtrip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.model.name == "vit_digits"
    path = save_config(cfg, tmp_path)
    again = config_from_dict(yaml.safe_load(path.read_text()))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_yaml_and_overrides_apply_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  batch_size: 16\npretrain:\n  epochs: 3\n")
    cfg = load_config(p, ["pretrain.epochs=5", "profile.energy=[model]", "search.latency_budget_ms=2.5"])
    assert cfg.data.batch_size == 16 and cfg.pretrain.epochs == 5
    assert cfg.profile.energy == ["model"] and cfg.search.latency_budget_ms == 2.5


def test_int_accepted_for_float():
    assert load_config(None, ["pretrain.lr=1"]).pretrain.lr == 1.0


@pytest.mark.parametrize("override, fragment", [
    ("pretrain.epochz=3", "pretrain.epochz"),
    ("nosuch.key=1", "nosuch"),
    ("pretrain.epochs=three", "pretrain.epochs"),
    ("data.augment=3", "data.augment"),
    ("data.name=mnist", "data.name"),
    ("profile.batch=0", "profile.batch"),
    ("profile.trials=-1", "profile.trials"),
    ("profile.energy=model", "profile.energy"),
    ("pretrain.epochs=true", "pretrain.epochs"),
    ("bench.dense_tvm=3", "bench.dense_tvm"),
    ("bench.dense_tvm=[true]", "bench.dense_tvm"),
])
def test_bad_values_name_the_dotted_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_is_a_config_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_shipped_configs_load():
    for name in ("default.yaml", "deit_tiny_imagenet.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.model.name


def test_default_yaml_is_the_built_in_default():
    assert config_to_dict(load_config(ROOT / "configs" / "default.yaml")) == config_to_dict(load_config())


def test_one_gate_default_for_layer_reparameterize_and_config():
    import inspect

    import models.moe
    from dse.config import FinetuneConfig
    from models.moe import DEFAULT_GATE, MoELinear
    from models.reparam import reparameterize

    assert MoELinear(4, 4).gate_mode == DEFAULT_GATE
    assert inspect.signature(reparameterize).parameters["gate"].default == DEFAULT_GATE
    assert FinetuneConfig().gate == DEFAULT_GATE
    assert f"(``{DEFAULT_GATE}``)" in models.moe.__doc__  # the docstring names the default it documents
