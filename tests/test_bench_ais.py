"""benchmarks/bench_ais.py and bench.py's ``--only ais`` / loss rows: their code runs, in a smoke size.

Not timing checks (the machine running the tests is shared): the rows exist under their exact
names, every figure is a positive number, and the ratios are the ratios of the rows printed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TEST_DATA

from benchmarks import bench, bench_ais

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROWS = (bench_ais.AIS_VS_AMG, bench_ais.AIS_VS_ENCODER, bench_ais.APG_VS_AMG)


def test_the_rows_have_the_issues_names() -> None:
    assert ROWS + (bench_ais.FROZEN_EPOCH,) == (
        "ais per image / amg per image", "ais per image / encoder forward", "apg per image / amg per image",
        "frozen-encoder epoch with --instance_decoder / without")


def test_only_ais_quick_writes_the_rows_to_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--only", "ais", "--quick", "--reps", "1", "--json", str(out),
                       "--data_dir", str(TEST_DATA / "em_vnc")]) == 0
    figures = json.loads(out.read_text())
    assert all(figures[name] > 0 for name in ROWS)
    size = "vit_t 256 px, 2 threads"
    ais, apg = figures[f"ais per image, {size} (s)"], figures[f"apg per image, {size} (s)"]
    amg, encoder = figures[f"amg per image, 8x8 points, {size} (s)"], figures[f"encoder forward, {size} (s)"]
    assert figures[bench_ais.AIS_VS_AMG] == pytest.approx(ais / amg)
    assert figures[bench_ais.AIS_VS_ENCODER] == pytest.approx(ais / encoder)
    assert figures[bench_ais.APG_VS_AMG] == pytest.approx(apg / amg)
    assert bench_ais.FROZEN_EPOCH in figures  # training has --instance_decoder: the row is always measured
    assert figures[bench_ais.FROZEN_EPOCH] > 0


def test_the_loss_resolution_rows_still_run() -> None:
    from samlora.data import dataset

    rows: dict[str, float] = {}
    samples = dataset.load_dataset(TEST_DATA / "em_vnc")[:1]
    bench.bench_loss_resolution("vit_t", samples, 1, lambda name, value, target="": rows.update({name: value}), 256)
    assert rows["step with loss at input resolution / at decoder resolution"] > 0
    assert rows["frozen-encoder step with loss at input resolution / at decoder resolution"] > 0


def test_reps_below_one_are_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--only", "ais", "--reps", "0"])
    assert exit_info.value.code == 2 and "--reps must be at least 1" in capsys.readouterr().err
