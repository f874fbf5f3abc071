"""Stored GPU-window features: packed values under a layout of their names."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from server.store import Store, StoreError
from server.store.features import layout_of, pack_values, unpack_features
from tests.server.test_store import _enrol, _envelope


@given(st.dictionaries(st.text(max_size=40), st.floats(width=64), max_size=40))
def test_packed_features_read_back_exactly_in_order(features: dict[str, float]) -> None:
    layout = layout_of(features)
    read = unpack_features(layout.names_json, pack_values(features))
    assert list(read) == list(features)
    # Bit for bit, NaN included: compare the packed bytes.
    assert pack_values(read) == pack_values(features)


def test_the_layout_id_depends_on_the_names_and_their_order_only() -> None:
    assert layout_of({"a_pct": 1.0, "b_w": 2.0}) == layout_of({"a_pct": 5.0, "b_w": 6.0})
    assert layout_of({"a_pct": 1.0, "b_w": 2.0}) != layout_of({"b_w": 2.0, "a_pct": 1.0})


MISMATCHED_VALUES = [
    pytest.param(b"\x00" * 8, id="fewer-values-than-names"),
    pytest.param(b"\x00" * 24, id="more-values-than-names"),
]


@pytest.mark.parametrize("packed", MISMATCHED_VALUES)
def test_values_that_do_not_fit_the_layout_are_refused(packed: bytes) -> None:
    with pytest.raises(ValueError, match="feature names"):
        unpack_features('["a_pct", "b_w"]', packed)


def test_a_layout_id_stored_with_other_names_refuses_the_commit(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    with Store.open(url) as store:
        _enrol(store, "agent-a", "host-a", "key-a")
        envelope = _envelope("agent-a", 1)
        layout = layout_of(envelope.gpus[0].features)
        # A collision of 64-bit ids cannot be found by chance: stage one by hand.
        with create_engine(url).begin() as conn:
            conn.execute(
                text("INSERT INTO feature_layouts VALUES (:id, :names)"),
                {"id": layout.layout_id, "names": '["something_else_pct"]'},
            )
        with pytest.raises(StoreError, match="other names"):
            store.store_accepted([envelope])
        assert store.count_envelopes() == 0


def test_windows_of_two_layouts_read_back_with_their_own_names(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    first = _envelope("agent-a", 1)
    other_gpu = replace(first.gpus[0], features={"energy_j": 12.5})
    second = replace(_envelope("agent-a", 2), gpus=(other_gpu,))
    with Store.open(url) as store:
        _enrol(store, "agent-a", "host-a", "key-a")
        store.store_accepted([first, second])
        windows = store.list_windows()
    assert [w.features for w in windows] == [
        *(gpu.features for gpu in first.gpus),
        {"energy_j": 12.5},
    ]
