"""runs.py: what differs between a recorded run's (or search's) options and the current ones."""
from __future__ import annotations

from samlora.training import runs
from samlora.training.config import TrainConfig


def test_differences_fill_options_newer_than_the_record_with_their_defaults() -> None:
    config = TrainConfig(data_dir="d", output_dir="o", epochs=7)
    current, defaults = config.to_json(), runs.option_defaults(config)
    older = {k: v for k, v in current.items() if k not in ("max_objects", "epochs")}  # before both existed
    assert runs.differences(older, current, defaults) == [f"epochs: {defaults['epochs']!r} -> 7"]
    assert runs.differences({**current, "dropped_option": 1}, current, defaults) == []  # no longer an option
    nested = runs.differences({"base": older, "data": "a"}, {"base": current, "data": "b"}, {"base": defaults})
    assert nested == [f"base.epochs: {defaults['epochs']!r} -> 7", "data: 'a' -> 'b'"]
    assert runs.differences({}, {"base": current, "data": "b"}, {"base": defaults}) == []  # nothing recorded
