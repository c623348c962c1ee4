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
