"""Property-based fuzzing of the three loaders users feed files to: the config loader, the assignment
loader and the profile loader. Whatever the input, each either returns a valid object or raises one of
the documented errors (a :class:`ShiftAddError` whose message is one line) — never a traceback from
deep inside YAML, pandas or a dataclass.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from dse.config import Config, config_to_dict, load_config, parse_override
from dse.profiling.store import COLUMNS, load_profile
from kernels.errors import ShiftAddError
from models.assignment import Assignment, layer_kinds

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Scalars YAML can carry, including the awkward ones (NaN, inf, huge ints, empty and multi-line strings).
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{path}."))
    return keys


# Real dotted keys of the config tree, so most examples reach the type checks, not only the unknown-key check.
CONFIG_KEYS = _dotted_keys(config_to_dict(Config()))


def documented(exc: BaseException) -> None:
    assert isinstance(exc, ShiftAddError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message, repr(message)


def _nest(dotted: str, value: object) -> dict:
    out: object = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out  # type: ignore[return-value]


# ---- config ----------------------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.sampled_from(CONFIG_KEYS), st.text(max_size=12)), values), max_size=4))
def test_config_from_random_mappings(tmp_path_factory, entries):
    data: dict = {}
    for key, value in entries:
        data.update(_nest(key, value) if key else {key: value})
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        cfg = load_config(path)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions escape
        documented(exc)
    else:
        assert isinstance(cfg, Config) and dataclasses.is_dataclass(cfg)


@FUZZ
@given(st.text(max_size=200))
def test_config_from_random_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except Exception as exc:  # noqa: BLE001
        documented(exc)


@FUZZ
@given(st.one_of(st.sampled_from(CONFIG_KEYS), st.text(max_size=12)), st.text(max_size=20))
def test_config_from_random_overrides(key, value):
    text = f"{key}={value}"
    try:
        parse_override(text)
        load_config(None, [text])
    except Exception as exc:  # noqa: BLE001
        documented(exc)


# ---- assignment -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    return models.create("vit_digits", depth=2)


@FUZZ
@given(st.data())
def test_assignment_from_random_yaml(tiny_model, tmp_path_factory, data):
    kinds = layer_kinds(tiny_model)
    names = st.one_of(st.sampled_from(sorted(kinds)), st.text(max_size=16))
    choices = st.one_of(st.sampled_from(["msa", "hamming", "mult", "shift", "moe"]), values)
    section = st.one_of(st.dictionaries(names, choices, max_size=4), values)
    doc = data.draw(st.one_of(
        st.dictionaries(st.sampled_from(["attention", "linear", "capacity", "extra"]), section, max_size=3),
        values))
    path = tmp_path_factory.mktemp("asg") / "a.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        assignment = Assignment.from_yaml(path)
        assignment.validate(tiny_model)
    except Exception as exc:  # noqa: BLE001
        documented(exc)
    else:
        for name, choice in {**assignment.attention, **assignment.linear}.items():
            assert name in kinds and choice in ("msa", "hamming", "mult", "shift", "moe")


# ---- profile ----------------------------------------------------------------------------------------

GOOD_ROW = {"primitive": "matmul", "batch": "1", "m": "520", "k": "96", "n": "384", "dtype": "float32",
            "latency_ms": "0.41", "latency_ms_p90": "0.5", "repeats": "7", "energy_mj": "0.1", "energy_source": "model",
            "target": "llvm", "tuned_trials": "0", "backend": "tvm", "schedule": "default", "idle_power_w": "",
            "measured_at": "2026-11-22T00:00:00"}
META = {"device": {"name": "cpu", "slug": "cpu", "kind": "cpu"}, "target": {"kind": "llvm"},
        "target_slug": "llvm", "versions": {"tvm": "0.27.0", "torch": "2.14.1"}}


def _csv(rows: list[dict[str, str]], columns: list[str]) -> str:
    lines = [",".join(columns)]
    lines += [",".join(row.get(c, "") for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def test_the_fuzzed_profile_baseline_loads(tmp_path):
    """The unmutated input of the fuzzer is valid, so the fuzzer exercises the checks, not the header."""
    path = tmp_path / "p.csv"
    path.write_text(_csv([GOOD_ROW], list(COLUMNS)))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(META))
    prof = load_profile(path)
    assert len(prof) == 1 and math.isclose(float(prof.frame["latency_ms"].iloc[0]), 0.41)


@FUZZ
@given(st.data())
def test_profile_from_mutated_csv(tmp_path_factory, data):
    columns = list(COLUMNS)
    if data.draw(st.booleans()):  # drop, duplicate or rename a column
        i = data.draw(st.integers(0, len(columns) - 1))
        columns = data.draw(st.sampled_from([columns[:i] + columns[i + 1:], columns + [columns[i]],
                                             columns[:i] + [data.draw(st.text(max_size=8))] + columns[i + 1:]]))
    rows = []
    for _ in range(data.draw(st.integers(0, 3))):
        row = dict(GOOD_ROW)
        for column in data.draw(st.lists(st.sampled_from(list(COLUMNS)), max_size=3)):
            row[column] = data.draw(st.one_of(st.text(max_size=10), st.sampled_from(
                ["nan", "-1", "inf", "1e400", "", "0", "3.5", "matshift", "bogus"])))
        rows.append(row)
    text = _csv(rows, columns)
    if data.draw(st.booleans()):  # truncated mid-write
        text = text[:data.draw(st.integers(0, len(text)))]
    folder = tmp_path_factory.mktemp("prof")
    path = folder / "p.csv"
    path.write_text(text)
    meta = data.draw(st.one_of(st.just(META), values))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(meta, allow_unicode=True))
    try:
        prof = load_profile(path)
    except Exception as exc:  # noqa: BLE001
        documented(exc)
    else:
        frame = prof.frame
        assert (frame["latency_ms"] > 0).all() and frame["latency_ms"].map(math.isfinite).all()


def test_documented_rejects_foreign_exceptions():
    """The property's oracle itself can fail: a raw library error is not a documented one."""
    with pytest.raises(AssertionError):
        documented(KeyError("x"))
    with pytest.raises(AssertionError):
        documented(ShiftAddError(""))
    documented(ShiftAddError("one line; do this"))


def test_messages_quoting_line_breaks_stay_one_line():
    """User input quoted in a message (here a YAML key holding a newline) is escaped by the root class."""
    exc = ShiftAddError("unknown config key 'a\nb\r'")
    assert str(exc) == "unknown config key 'a\\nb\\r'"
    documented(exc)
