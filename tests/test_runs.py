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


def test_a_run_resumes_from_a_config_with_or_without_its_schema(tmp_path) -> None:
    """config.json carries ``schema``; a record without one (and without a newer option) resumes."""
    import pytest

    from samlora.core import runfiles
    from samlora.core.errors import UserError

    config = TrainConfig(data_dir="d", output_dir=str(tmp_path / "run"))
    for record in ({**config.to_json(), runfiles.SCHEMA: runs.CONFIG_SCHEMA},
                   {k: v for k, v in config.to_json().items() if k != "epochs"}):
        runfiles.write_json(tmp_path / "run" / runs.CONFIG_FILE, record)
        assert runs.claim_output_dir(config, resume=True, overwrite=False).path == tmp_path / "run"
    runfiles.write_json(tmp_path / "run" / runs.CONFIG_FILE, {**config.to_json(), "epochs": 99})
    with pytest.raises(UserError, match="epochs: 99"):
        runs.claim_output_dir(config, resume=True, overwrite=False)
