"""The last-known state's merge: partial readings fill in, the newest value wins, replays
and rebuilds give the same state."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.domain.records import AvailabilityRecord, CanonicalReading, DeviceState
from gateway.domain.state import (
    DeviceStates,
    decode_state,
    empty_state,
    with_availability,
    with_reading,
)

pytestmark = pytest.mark.unit

T0 = 1_795_680_000_000


def reading(
    ts: int, device_type: str = "thermostat", device_id: str = "t1", **metrics: float | bool
) -> CanonicalReading:
    return {
        "device_id": device_id,
        "type": device_type,
        "ts": ts,
        "seq": None,
        "metrics": metrics,
        "received_at": ts,
    }


def availability(ts: int, online: bool) -> AvailabilityRecord:
    return {"device_id": "t1", "online": online, "ts": ts, "source": "envelope"}


Record = CanonicalReading | AvailabilityRecord


def merged(*records: Record, state: DeviceState | None = None) -> DeviceState:
    """`state` (none: the empty one) after `records`, in their order."""
    state = state or empty_state("t1")
    for record in records:
        if "online" in record:
            state = with_availability(state, record)  # type: ignore[arg-type]
        else:
            state = with_reading(state, record)
    return state


def test_partial_readings_fill_in_over_the_previous_state() -> None:
    """Each metric keeps the value of the newest reading that carried it."""
    state = merged(
        reading(T0, temperature_c=21.5, humidity_pct=40.0),
        reading(T0 + 1000, temperature_c=22.0),
        reading(T0 + 2000, heating=True),
    )
    assert state["metrics"] == {
        "temperature_c": {"value": 22.0, "ts": T0 + 1000},
        "humidity_pct": {"value": 40.0, "ts": T0},
        "heating": {"value": True, "ts": T0 + 2000},
    }
    assert (state["type"], state["last_seen"]) == ("thermostat", T0 + 2000)
    assert (state["online"], state["online_ts"], state["online_since"]) == (None, None, None)


def test_a_late_older_reading_fills_only_what_is_older() -> None:
    """A reading older than the state's values leaves them, fills a metric the state
    lacks, and moves neither last_seen nor type."""
    state = merged(
        reading(T0 + 5000, temperature_c=22.0),
        reading(T0, device_type="climate", temperature_c=19.0, humidity_pct=55.0),
    )
    assert state["metrics"] == {
        "temperature_c": {"value": 22.0, "ts": T0 + 5000},
        "humidity_pct": {"value": 55.0, "ts": T0},
    }
    assert (state["type"], state["last_seen"]) == ("thermostat", T0 + 5000)


def test_of_two_readings_with_one_ts_the_later_wins() -> None:
    """A plug switched on and off within its clock's resolution shows off."""
    state = merged(reading(T0, on=True), reading(T0, on=False))
    assert state["metrics"]["on"] == {"value": False, "ts": T0}


def test_online_follows_the_newest_availability_record() -> None:
    """`online` is the newest record's; `online_since` moves only when it changes, and an
    older record arriving late changes nothing."""
    state = merged(availability(T0, True), availability(T0 + 60_000, True))
    assert (state["online"], state["online_ts"], state["online_since"]) == (
        True, T0 + 60_000, T0,
    )  # fmt: skip
    state = with_availability(state, availability(T0 + 120_000, False))
    assert (state["online"], state["online_since"]) == (False, T0 + 120_000)
    assert with_availability(state, availability(T0 + 90_000, True)) == state


records = st.lists(
    st.one_of(
        st.builds(
            reading,
            st.integers(T0, T0 + 20),
            st.sampled_from(["thermostat", "climate"]),
            temperature_c=st.floats(-40, 85),
            heating=st.booleans(),
        ),
        st.builds(
            lambda ts, metric, value: reading(ts, **{metric: value}),
            st.integers(T0, T0 + 20),
            st.sampled_from(["temperature_c", "humidity_pct"]),
            st.floats(0, 100),
        ),
        st.builds(availability, st.integers(T0, T0 + 20), st.booleans()),
    ),
    max_size=30,
)


@given(records, st.data())
def test_merging_again_from_any_offset_changes_nothing(
    log: list[Record], data: st.DataObject
) -> None:
    """A restart merges again what it had not committed: the state stays what it was."""
    state = merged(*log)
    start = data.draw(st.integers(0, len(log)))
    assert merged(*log[start:], state=state) == state


@given(records, st.randoms())
def test_any_interleaving_of_the_two_topics_gives_one_state(
    log: list[Record], chance: random.Random
) -> None:
    """Live and rebuilt states read the readings and availability topics in different
    interleavings, each topic in its order: the state is the same."""
    readings = [r for r in log if "online" not in r]
    presence = [r for r in log if "online" in r]
    interleaved: list[Record] = []
    while readings or presence:
        take = readings if readings and (not presence or chance.random() < 0.5) else presence
        interleaved.append(take.pop(0))
    assert merged(*interleaved) == merged(*log)


def test_device_states_report_only_what_changed() -> None:
    """A batch's changed devices are written once; merging it again writes nothing."""
    states = DeviceStates()
    batch = [reading(T0, temperature_c=21.0), reading(T0, device_id="t2", temperature_c=5.0)]
    for r in batch:
        states.reading(r)
    states.availability(availability(T0, True))
    assert list(states.take_changed()) == ["t1", "t2"]
    for r in batch:
        states.reading(r)
    assert states.take_changed() == {}


def test_a_state_record_decodes_to_what_was_encoded() -> None:
    """A state written as JSON reads back equal, values keeping their kind; junk is refused."""
    state = merged(reading(T0, temperature_c=21.5, heating=True), availability(T0, True))
    state = with_reading(state, reading(T0 + 1, device_type="smart_plug", power_w=12))
    assert decode_state(json.dumps(state).encode()) == state
    assert type(decode_state(json.dumps(state).encode())["metrics"]["power_w"]["value"]) is int
    with pytest.raises(ValueError, match="not a device state"):
        decode_state(b'{"device_id": "t1"}')
