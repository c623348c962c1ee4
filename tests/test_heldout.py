"""heldout.py through evaluate: an adapter is scored on the images it never trained on unless told otherwise."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import crop_em_sections

SMALL = ["--checkpoint", "none", "--device", "cpu"]
TINY_TRAIN = ["--model_type", "vit_t", "--image_size", "256", "--max_objects", "4", "--freeze_encoder",
              "--lora_targets", "decoder", "--lora_rank", "2", "--no_augment", "--epochs", "1",
              "--cross_validation", "--num_folds", "2"]


@pytest.fixture(scope="module")
def run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six EM crops and a 2-fold run trained on them (vit_t, 256 px, random base weights)."""
    import main as main_module

    root = tmp_path_factory.mktemp("heldout")
    data = crop_em_sections(shared_data, root / "em", dict(zip("abcdef", ("00", "03", "06", "09", "12", "15"))))
    assert main_module.main(["train", "--data_dir", str(data), "--output_dir", str(root / "run"), *SMALL,
                             *TINY_TRAIN]) == 0
    return data, root / "run"


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "per_image.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_adapter_is_scored_on_its_held_out_images_by_default(main, run, tmp_path: Path, one_thread) -> None:
    data, run_dir = run
    fold = json.loads((run_dir / "folds.json").read_text())["folds"][0]
    args = ["evaluate", "--data_dir", str(data), *SMALL, "--compare", "base=base",
            f"lora={run_dir / 'fold_0' / 'best.pt'}"]
    assert main([*args, "--output_dir", str(tmp_path / "a")]) == 0
    scored = rows(tmp_path / "a")
    lora = [r for r in scored if r["model"] == "lora"]
    assert sorted(r["path"] for r in lora) == sorted(str(data / p) for p in fold["val_paths"])
    assert {r["seen_in_training"] for r in scored} == {"no"}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["split"] == "held-out" and "base@1024" in summary["models"]  # zero-shot at 1024 px too
    assert set(summary["paired"]) == {"lora vs base", "lora vs base@1024"}
    assert summary["prompt_protocol"].startswith("one box per object")
    # every image: refused unless asked for, then marked
    assert main([*args, "--split", "all", "--output_dir", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()
    assert main([*args, "--split", "all", "--include_training_images", "--output_dir", str(tmp_path / "c")]) == 0
    marked = {r["path"]: r["seen_in_training"] for r in rows(tmp_path / "c") if r["model"] == "lora"}
    assert sum(v == "yes" for v in marked.values()) == len(fold["train"]) and len(marked) == 6
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["seen_in_training"]["lora"] == len(fold["train"])
    assert "images it was trained on" in (tmp_path / "c" / "evaluate.log").read_text()


def test_held_out_default_is_the_folds_validation_part_not_its_gap(em_crops, tmp_path: Path, caplog) -> None:
    """The 20 consecutive real EM sections, 5 folds, --slice_block 2: fold 1 holds out sections
    4-7, and its --fold_gap sections 2, 3, 8, 9 (left out of its training, but bordering training
    sections on their other side) count as seen: the default scores exactly 4-7, and with
    --include_training_images every other section is marked seen_in_training."""
    from samlora.core.errors import UserError
    from samlora.data import dataset
    from samlora.data import folds as folds_lib
    from samlora.evaluation import heldout
    from samlora.evaluation.scoring import Job, seen_mark
    from samlora.training import runs

    data = em_crops({f"{k:02d}": f"{k:02d}" for k in range(20)}, 128)  # named by section: one volume
    samples = dataset.load_dataset(data, slice_block=2)
    assert [s.slice_index for s in samples] == list(range(20))
    grouping = folds_lib.Grouping(2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    folds_lib.save_folds(run_dir, folds_lib.make_folds(samples, 5, seed=0, grouping=grouping), samples, seed=0,
                         grouping=grouping)
    fold = json.loads((run_dir / "folds.json").read_text())["folds"][1]
    assert fold["val"] == [4, 5, 6, 7] and fold["gap"] == [2, 3, 8, 9]
    adapter = run_dir / "fold_1" / "best.pt"  # where train writes it (runs.seen_by reads only folds.json)
    seen = {adapter: runs.seen_by(adapter, samples)}
    indices, fold_of, split = heldout.choose_images(samples, None, None, data, seen)
    assert split == "held-out" and [samples[i].slice_index for i in indices] == [4, 5, 6, 7]
    everything = list(range(20))
    with pytest.raises(UserError, match="16 of the 20 images"):
        heldout.check_seen(samples, everything, seen, "all", include_training_images=False)
    heldout.check_seen(samples, everything, seen, "all", include_training_images=True)
    selection = heldout.Selection(samples, "all", everything, {}, 0, {}, seen)
    job = Job(runs.ModelSource("lora", "adapter", adapter), adapter, None)
    marks = {samples[i].slice_index: seen_mark(selection, job, i) for i in everything}
    assert [z for z, mark in marks.items() if mark == "no"] == [4, 5, 6, 7]
    assert all(marks[z] == "yes" for z in (2, 3, 8, 9))


def test_errors_name_parameters_and_the_command_names_flags(tmp_path: Path) -> None:
    """heldout / scoring take typed options and their errors name parameters; evaluate's
    errors.as_flags reports the same sentence with the flags."""
    from samlora.core.errors import OptionError, UserError, as_flags
    from samlora.data.dataset import DataOptions
    from samlora.evaluation import heldout
    from samlora.evaluation.scoring import ScoreOptions

    with pytest.raises(OptionError) as caught:
        heldout.data_options(DataOptions(), None, [], None)
    assert str(caught.value) == "data_dir is required (or cv_run RUN to evaluate a run on its own data)"
    assert caught.value.parameters == ("data_dir", "cv_run")
    with pytest.raises(UserError, match="^--bootstrap must be at least 1, got 0$"):
        with as_flags():
            ScoreOptions(bootstrap=0)
    with pytest.raises(OptionError, match="^max_objects must be at least 0"):
        ScoreOptions(max_objects=-1)
    assert heldout.data_options(DataOptions(patch_size=64), tmp_path, [], None) == (tmp_path, DataOptions(patch_size=64))
