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
    chosen, lr_at = [], {}
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
