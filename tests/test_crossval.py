"""crossval.py: the epoch is chosen on an inner split, the outer fold only scores; the final fit and the test split."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import crop_em_sections

TINY = ["--checkpoint", "none", "--model_type", "vit_t", "--image_size", "256", "--max_objects", "4",
        "--freeze_encoder", "--lora_targets", "decoder", "--lora_rank", "2", "--lora_alpha", "4",
        "--learning_rate", "3e-3", "--no_augment", "--device", "cpu", "--val_fraction", "0.34"]
SECTIONS = {name: section for name, section in zip("abcdef", ("00", "03", "06", "09", "12", "15"))}


@pytest.fixture(scope="module")
def crops(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 256 px crops of real EM sections (unrelated names: each its own group)."""
    return crop_em_sections(shared_data, tmp_path_factory.mktemp("cv") / "crops", SECTIONS)


@pytest.mark.slow
def test_outer_labels_never_reach_the_chosen_checkpoint(main, crops: Path, tmp_path: Path, one_thread) -> None:
    """Changing only the labels of fold 0's outer images leaves fold 0's chosen checkpoint
    bit-identical (the epoch was chosen on an inner split); only its outer score changes."""
    argv = [*TINY, "--cross_validation", "--num_folds", "2", "--epochs", "3"]
    first = tmp_path / "first"
    assert main(["train", "--data_dir", str(crops), "--output_dir", str(first), *argv]) == 0
    outer = json.loads((first / "folds.json").read_text())["folds"][0]["val_paths"]
    changed = tmp_path / "changed"
    shutil.copytree(crops, changed)
    for source in outer:  # images/x.png: new labels, the image itself untouched
        mask = np.zeros((256, 256), np.uint8)
        mask[64:192, 64:192] = 255
        cv2.imwrite(str(changed / "masks" / Path(source).name), mask)
    second = tmp_path / "second"
    assert main(["train", "--data_dir", str(changed), "--output_dir", str(second), *argv]) == 0
    a = torch.load(first / "fold_0" / "best.pt", weights_only=True)["state_dict"]
    b = torch.load(second / "fold_0" / "best.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done_a, done_b = (json.loads((run / "fold_0" / "done.json").read_text()) for run in (first, second))
    assert done_a["selection"] == "inner validation split" and done_a["selection_size"] >= 1
    assert done_a["best_epoch"] == done_b["best_epoch"] and done_a["selection_dice"] == done_b["selection_dice"]
    assert [r["dice"] for r in done_a["scored"]] != [r["dice"] for r in done_b["scored"]]
    summary = json.loads((first / "summary.json").read_text())
    cv = summary["cv_estimate"]
    assert cv["n_images"] == 6 and cv["dice"]["ci_low"] <= cv["dice"]["mean"] <= cv["dice"]["ci_high"]


@pytest.mark.slow
def test_final_fit_is_scored_once_on_the_fixed_test_split(main, shared_data: Path, tmp_path: Path,
                                                          one_thread) -> None:
    data = tmp_path / "data"
    crop_em_sections(shared_data, data / "train", {k: v for k, v in list(SECTIONS.items())[:4]})
    crop_em_sections(shared_data, data / "test", {"t": "18"})
    out = tmp_path / "run"
    assert main(["train", "--data_dir", str(data), "--output_dir", str(out), *TINY, "--cross_validation",
                 "--num_folds", "2", "--epochs", "2", "--final_fit"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["final"]["adapter"]) == out / "final" / "best.pt" and (out / "final" / "best.pt").is_file()
    assert summary["final"]["train_size"] == 4 and 1 <= summary["final"]["epochs"] <= 2
    assert summary["test"]["n_images"] == 1 and [r["key"] for r in summary["test"]["scored"]] == ["test/images/t.png"]
    assert summary["cv_estimate"]["n_images"] == 4  # the test image never entered the folds
    rows = (out / "metrics.csv").read_text().splitlines()
    assert any(row.startswith("final,") for row in rows)

    # the final fit takes as many optimiser steps as a fold took to its chosen checkpoint (here one
    # image per fold epoch, four per final epoch), on a fold's learning-rate schedule
    chosen = []
    for k in range(2):
        done = json.loads((out / f"fold_{k}" / "done.json").read_text())
        per_epoch = torch.load(out / f"fold_{k}" / "last.pt", weights_only=True)["scheduler"]["last_epoch"] // \
            done["epochs_run"]
        assert per_epoch == 1
        chosen.append(per_epoch * (done["best_epoch"] + 1))
    final_steps = torch.load(out / "final" / "last.pt", weights_only=True)["scheduler"]["last_epoch"]
    assert final_steps == round(float(np.median(chosen)))  # the chosen epoch count took 4x as many
    assert summary["final"]["steps"] == final_steps
    header = rows[0].split(",")
    lr = {(r[header.index("fold")], int(r[header.index("epoch")])): float(r[header.index("lr")])
          for r in (row.split(",") for row in rows[1:])}
    assert lr[("final", summary["final"]["epochs"] - 1)] == pytest.approx(lr[("0", final_steps - 1)])

def test_cv_estimate_resamples_source_images_of_patches(shared_data: Path) -> None:
    """Outer-fold rows of real MoNuSeg patches (3 tiles, 12 patches of 256 px): the interval of
    cv_estimate resamples the tiles (the fold grouping), and says so (unit, n_groups)."""
    from samlora.data import dataset
    from samlora.data import folds as folds_lib
    from samlora.metrics.bootstrap import summarize
    from samlora.training import crossval

    samples = dataset.load_dataset(shared_data / "nuclei_monuseg_train", patch_size=256)
    grouping = folds_lib.Grouping()
    keep = [i for i, s in enumerate(samples) if grouping.group(s) in sorted({grouping.group(s) for s in samples})[:3]]
    fg = [float((samples[i].labels > 0).mean()) for i in keep]  # a real per-patch number: the nuclei's share
    results = [{"fold": k, "best_epoch": 0, "selection": "inner validation split",
                "scored": [{"index": i, "key": samples[i].key, "dice": d, "iou": d / (2 - d)}
                           for i, d in zip(keep, fg) if i % 2 == k]} for k in range(2)]
    cv = crossval.summarize(results, samples, grouping, seed=0)["cv_estimate"]
    groups = [grouping.group(samples[r["index"]]) for result in results for r in result["scored"]]
    values = [r["dice"] for result in results for r in result["scored"]]
    assert cv["n_images"] == 12 and cv["n_groups"] == 3 and cv["unit"] == grouping.unit()
    assert cv["dice"] == summarize(values, seed=0, groups=groups)
    assert cv["dice"] != summarize(values, seed=0)  # not the patch-by-patch interval


def test_export_images_are_the_test_split_else_seen_training_images(em_split: Path, em3: Path) -> None:
    from samlora.data import dataset
    from samlora.training import crossval

    split = dataset.load_dataset(em_split)
    indices, what, seen = crossval.export_images(split)
    assert [split[i].key for i in indices] == ["test/images/02.png"] and not seen and "test split" in what
    plain = dataset.load_dataset(em3)
    indices, what, seen = crossval.export_images(plain)
    assert indices == [0, 1, 2] and seen and "seen in training" in what


@pytest.mark.slow
def test_export_merged_is_scored_before_it_is_written(main, em_split: Path, tmp_path: Path, one_thread,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """An adapter trained at 256 px, exported (at SAM's 1024 px): a warning, and the exported model
    itself scored on the fixed test split beside the final adapter (summary.json ``export``)."""
    from samlora.models import sam as sam_model

    out, export = tmp_path / "run", tmp_path / "merged.pt"
    assert main(["train", "--data_dir", str(em_split), "--output_dir", str(out), *TINY, "--cross_validation",
                 "--num_folds", "2", "--slice_block", "1", "--fold_gap", "0", "--epochs", "1",
                 "--export_merged", str(export)]) == 0
    assert "trained at 256 px input, the exported model runs at 1024 px" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    record = summary["export"]
    assert record["path"] == str(export) and export.is_file()
    assert record["image_size"] == 1024 and record["trained_image_size"] == 256
    assert record["images"] == "the fixed test split" and record["seen_in_training"] is False
    assert record["n_images"] == 1 and [r["key"] for r in record["scored"]] == ["test/images/02.png"]
    assert record["n_groups"] == 1 and record["unit"].startswith("fold groups")
    assert 0.0 <= record["dice"]["mean"] <= 1.0 and record["dice"]["mean"] == record["scored"][0]["dice"]
    # the final adapter at its own 256 px, on the same image, as the final fit's test score
    assert record["final_adapter"]["dice"]["mean"] == pytest.approx(summary["test"]["dice"]["mean"], abs=0.02)
    # the figures are those of the written file
    sam = sam_model.build_model("vit_t", None, 1024).sam
    sam.load_state_dict(torch.load(export, weights_only=True))
