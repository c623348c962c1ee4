"""runfiles.py: atomic writes with the user's umask, CSV through the csv module, the one output-directory rule."""
from __future__ import annotations

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import EM4, SMALL

from samlora.core import runfiles
from samlora.core.errors import UserError


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (all values as strings)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_are_atomic_and_follow_the_umask(tmp_path: Path, umask_022) -> None:
    path = runfiles.write_text(tmp_path / "a" / "notes.txt", "one")
    assert path.read_text() == "one" and mode(path) == 0o644
    os.umask(0o077)
    assert mode(runfiles.write_json(tmp_path / "private.json", {"b": 1, "a": 2})) == 0o600
    assert (tmp_path / "private.json").read_text() == '{\n "a": 2,\n "b": 1\n}\n'  # sorted keys

    def fails(fh) -> None:
        fh.write(b"half a file")
        raise RuntimeError("disk trouble")

    with pytest.raises(RuntimeError):
        runfiles.atomic_write(path, fails)
    assert path.read_text() == "one"  # the previous version is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["notes.txt"]  # no temporary file left


def test_csv_round_trips_commas_quotes_and_floats(tmp_path: Path) -> None:
    rows = [{"path": "/data/em, day 2/a.png", "note": 'said "hi"', "dice": 0.1 + 0.2, "fold": None},
            {"path": "b.png", "note": "line\nbreak", "dice": 1.0, "fold": 3}]
    path = runfiles.write_csv(tmp_path / "t.csv", rows, ["path", "note", "dice", "fold"])
    back = read_csv(path)
    assert [r["path"] for r in back] == [r["path"] for r in rows]
    assert [r["note"] for r in back] == [r["note"] for r in rows]
    assert float(back[0]["dice"]) == 0.1 + 0.2 and back[0]["fold"] == "" and back[1]["fold"] == "3"


def test_output_dir_rule(tmp_path: Path) -> None:
    out = runfiles.OutputDir(tmp_path / "run", "evaluate")
    out.claim(overwrite=False)  # missing: taken
    with out.active():
        runfiles.write_text(out.path / "table.csv", "x")
        runfiles.write_text(out.path / "plots" / "a.png", "x")
    (out.path / "mine.txt").write_text("the user's notes")
    again = runfiles.OutputDir(out.path, "evaluate")
    with pytest.raises(UserError, match="holds an earlier `evaluate` run"):
        again.check(overwrite=False)
    again.claim(overwrite=True)  # removes what the earlier run recorded, and only that
    assert sorted(p.name for p in out.path.iterdir()) == [runfiles.MANIFEST, "mine.txt"]
    assert json.loads((out.path / runfiles.MANIFEST).read_text())["schema"] == runfiles.MANIFEST_SCHEMA
    with pytest.raises(UserError, match="holds the outputs of `evaluate`"):
        runfiles.OutputDir(out.path, "demo").check(overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        runfiles.OutputDir(foreign, "demo").check(overwrite=False)
    with pytest.raises(UserError, match="which is an input of this command"):
        runfiles.OutputDir(foreign / "results", "demo").check(overwrite=True, protected=[foreign])


def test_nested_runs_are_recorded_in_the_outer_directory(tmp_path: Path) -> None:
    search = runfiles.OutputDir(tmp_path / "search", "parameter_search").claim(overwrite=False)
    with search.active():
        runfiles.write_text(search.path / "results.csv", "x")
        inner = runfiles.OutputDir(search.path / "rank2", "train").claim(overwrite=False)
        with inner.active():
            runfiles.write_text(inner.path / "fold_0" / "best.pt", "x")
    assert "rank2/fold_0/best.pt" in search.recorded() and "fold_0/best.pt" in inner.recorded()
    runfiles.OutputDir(search.path, "parameter_search").claim(overwrite=True)
    assert sorted(p.name for p in search.path.iterdir()) == [runfiles.MANIFEST]  # nothing stale left


@pytest.mark.slow
def test_every_command_writes_with_the_umask_and_quoted_csv(main, em_crops, tmp_path: Path,
                                                            umask_022, one_thread) -> None:
    """train, parameter_search, evaluate, demo and detect predict on data whose path has a comma:
    every file they write is 0644 under umask 022, no temporary file is left, and every CSV
    reads back through the csv module with the comma path intact."""
    data = Path(shutil.copytree(em_crops(EM4, 256), tmp_path / "em, day 2"))
    shared = [*SMALL, "--data_dir", str(data), "--freeze_encoder", "--lora_targets", "decoder",
              "--max_objects", "2", "--epochs", "1", "--no_augment", "--num_folds", "2"]
    train = [*shared, "--lora_rank", "2", "--cross_validation"]  # the search sets both itself
    out = tmp_path / "out"
    commands = [
        ["train", *train, "--output_dir", str(out / "train")],
        ["parameter_search", *shared, "--lora_ranks", "2", "--lora_alphas", "2", "--learning_rates", "1e-3",
         "--output_dir", str(out / "search")],
        ["evaluate", "--cv_run", str(out / "train"), *SMALL, "--output_dir", str(out / "evaluate"), "--plot"],
        ["demo", *SMALL, "--samples_dir", str(data), "--num_samples", "1", "--output_dir", str(out / "demo")],
        ["detect", "predict", "--mode", "amg", "--input", str(data / "images" / "a.png"), "--points_per_side", "2",
         *SMALL, "--output_dir", str(out / "detect")],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 30
    assert [p for p in files if mode(p) != 0o644] == []
    assert [p for p in files if p.name.endswith(".tmp")] == []
    paths = []
    for table in (p for p in files if p.suffix == ".csv"):
        with open(table, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(None not in r for r in rows), table  # no row has more fields than the header
        paths += [r["path"] for r in rows if "path" in r]
    assert paths and all(p.startswith(str(data)) for p in paths)



def test_refused_commands_claim_no_output_directory(main, em_crops, shared_data: Path, tmp_path: Path,
                                                    one_thread) -> None:
    """Options that are refused only once the data is read (impossible folds, a bad --fold, an
    unreadable input) write nothing, so the corrected command runs into the same directory."""
    data = em_crops(EM4, 128)
    out = tmp_path / "out"
    options = ["--data_dir", str(data), *SMALL, "--freeze_encoder", "--lora_targets", "decoder", "--lora_rank", "2",
               "--epochs", "1", "--no_augment", "--num_folds", "10"]  # 4 images: no 10 folds
    assert main(["train", *options, "--cross_validation", "--output_dir", str(out / "train")]) == 2
    assert main(["parameter_search", *options, "--output_dir", str(out / "search")]) == 2
    detect = ["detect", "train", "--data_dir", str(data), "--output_dir", str(out / "yolo"), "--fold", "3",
              "--epochs", "1"]
    assert main(detect) == 2
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    assert main(["detect", "predict", "--mode", "amg", "--input", str(bad), *SMALL,
                 "--output_dir", str(out / "predict")]) == 2
    assert not out.exists()


def test_an_input_folder_is_never_an_output_folder(main, em_crops, tmp_path: Path) -> None:
    data = Path(shutil.copytree(em_crops(EM4, 128), tmp_path / "em"))
    argv = ["detect", "predict", "--mode", "amg", "--input", str(data / "images"), *SMALL, "--overwrite"]
    assert main([*argv, "--output_dir", str(data / "images")]) == 2
    assert main(["demo", *SMALL, "--samples_dir", str(data), "--output_dir", str(data / "demo"), "--overwrite"]) == 2
    assert sorted(p.name for p in data.iterdir()) == ["images", "masks"]


def test_a_shared_output_dir_keeps_every_workers_record(tmp_path: Path) -> None:
    """Two processes write into one shared directory at once (the workers of a parameter search):
    the manifest, merged under the directory's lock, records every file of both."""
    import subprocess
    import sys

    from conftest import REPO

    out = runfiles.OutputDir(tmp_path / "search", "parameter_search", shared=True).claim(overwrite=False)
    worker = ("import sys; sys.path.insert(0, sys.argv[1]); from samlora.core import runfiles\n"
              "out = runfiles.OutputDir(sys.argv[2], 'parameter_search', shared=True).claim(False, resume=True)\n"
              "with out.active():\n"
              "    for i in range(40):\n"
              "        runfiles.write_text(out.path / sys.argv[3] / f'{i}.txt', 'x')\n")
    procs = [subprocess.Popen([sys.executable, "-c", worker, str(REPO), str(out.path), name]) for name in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(out.recorded()) == sorted(f"{name}/{i}.txt" for name in "ab" for i in range(40))
    assert out.user_files() == []  # the lock file is the directory's own
    runfiles.OutputDir(out.path, "parameter_search", shared=True).claim(overwrite=True)
    assert sorted(p.name for p in out.path.iterdir()) == sorted([runfiles.LOCK_FILE, runfiles.MANIFEST])


def test_the_directory_lock_is_reentrant_and_released_early(tmp_path: Path) -> None:
    outer, inner = runfiles.DirectoryLock(tmp_path), runfiles.DirectoryLock(tmp_path)
    with outer:
        with inner:  # the same process: shares the lock instead of waiting for itself
            assert len(runfiles.DirectoryLock._held) == 1
        assert runfiles.DirectoryLock._held  # the outer holder still has it
        outer.release()  # handed back early ...
        assert not runfiles.DirectoryLock._held
    assert not runfiles.DirectoryLock._held  # ... and leaving the block is harmless


def test_overwrite_keeps_what_the_command_clears_itself(tmp_path: Path) -> None:
    """``claim(overwrite=True, keep=...)``: a recorded database the command empties itself (the
    search's study.db, open while the directory is claimed) stays, and stays recorded."""
    out = runfiles.OutputDir(tmp_path / "search", "parameter_search", shared=True).claim(overwrite=False)
    with out.active():
        runfiles.write_text(out.path / "study.db", "a study")
        runfiles.write_text(out.path / "results.csv", "x")
    again = runfiles.OutputDir(out.path, "parameter_search", shared=True).claim(overwrite=True, keep=["study.db"])
    assert (out.path / "study.db").is_file() and not (out.path / "results.csv").exists()
    assert again.recorded() == ["study.db"]


def test_run_files_are_read_back_through_one_guarded_reader(tmp_path: Path) -> None:
    """read_json: the object a command wrote; a missing, corrupt or non-object file is one
    UserError line naming what the file should be."""
    path = runfiles.write_json(tmp_path / "run" / "summary.json", {"dice": 0.5, "data_dir": tmp_path})
    assert runfiles.read_json(path, "a finished training run") == {"dice": 0.5, "data_dir": str(tmp_path)}
    with pytest.raises(UserError, match="does not exist: is .* a finished training run"):
        runfiles.read_json(tmp_path / "run" / "missing.json", "a finished training run")
    path.write_text("{half")
    with pytest.raises(UserError, match="cannot read .*summary.json"):
        runfiles.read_json(path, "a finished training run")
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="does not hold a JSON object"):
        runfiles.read_json(path, "a finished training run")


def test_plain_record_writes_paths_as_strings(tmp_path: Path) -> None:
    record = runfiles.plain_record({"data_dir": tmp_path / "em", "seed": 3, "model": None, "name": "a"})
    assert record == {"data_dir": str(tmp_path / "em"), "seed": 3, "model": None, "name": "a"}
