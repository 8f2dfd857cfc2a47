"""dse.profiling.reference: the host-speed ratio now / at profiling, and profiles from before the field."""

from __future__ import annotations

import pytest

from dse.profiling import reference
from dse.profiling.store import load_profile
from tests.conftest import write_profile


def test_ratio_is_now_over_then():
    meta = {reference.META_KEY: reference.record([0.80, 0.50, 0.60])}
    assert reference.stored(meta)["latency_ms"] == pytest.approx(0.50)  # the fastest: a timing is only slowed
    assert reference.stored(meta)["samples_ms"] == [0.80, 0.50, 0.60]
    assert reference.speed_ratio(meta, 0.60) == pytest.approx(1.2)  # 20% slower now
    assert reference.speed_ratio(meta, 0.25) == pytest.approx(0.5)


def test_unknown_without_a_matching_entry():
    assert reference.speed_ratio({}, 0.5) is None
    other = {**reference.record([0.5]), "shape": [1, 128, 128, 128]}  # another kernel is no reference
    assert reference.speed_ratio({reference.META_KEY: other}, 0.5) is None
    assert reference.speed_ratio({reference.META_KEY: {**reference.record([0.0])}}, 0.5) is None


def test_profile_without_the_field_still_loads(profile_root):
    profile = load_profile(write_profile(profile_root))
    assert reference.META_KEY not in profile.meta and len(profile) > 0
    assert reference.speed_ratio(profile.meta, 1.0) is None
