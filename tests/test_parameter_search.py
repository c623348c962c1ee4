"""parameter_search: a grid of LoRA settings (ranks, encoder blocks) on the same grouped folds, ranked,
finished ones skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import trainer
from conftest import TINY_TRAIN
from main import main



@pytest.mark.slow
def test_parameter_search_ranks_and_skips(em6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "search"
    argv = ["parameter_search", "--data_dir", str(em6), "--output_dir", str(out), *TINY_TRAIN,
            "--lora_ranks", "2", "--lora_alphas", "4", "--learning_rates", "1e-3", "--num_folds", "2",
            "--epochs", "1", "--lora_blocks_grid", "all", "last2"]
    assert main(argv) == 0
    lines = (out / "results.csv").read_text().strip().splitlines()
    assert lines[0].startswith("name,lora_rank,lora_alpha,learning_rate,cv_dice,cv_dice_std")
    dices = [float(line.split(",")[4]) for line in lines[1:]]
    assert len(dices) == 2 and dices == sorted(dices, reverse=True)
    names = {line.split(",")[0]: line.rsplit(",", 1)[1] for line in lines[1:]}  # name -> lora_blocks
    assert names == {"rank2_alpha4_lr0.001": "all", "rank2_alpha4_lr0.001_blockslast2": "last2"}
    best = json.loads((out / "best_config.json").read_text())
    assert best["cv_dice"] == dices[0]
    # every configuration trained on the same folds
    folds = {json.dumps(json.loads((d / "folds.json").read_text())["folds"]) for d in out.glob("rank*")}
    assert len(list(out.glob("rank*"))) == 2 and len(folds) == 1
    late = torch.load(out / "rank2_alpha4_lr0.001_blockslast2" / "fold_0" / "best.pt", weights_only=True)
    assert late["config"]["blocks"] == [8, 9] and best["config"]["lora_blocks"] == best["lora_blocks"]
    assert json.loads((out / "folds.json").read_text())["folds"] == json.loads(folds.pop())
    # a re-run skips finished configurations
    monkeypatch.setattr(trainer, "run_fold", lambda *a, **k: pytest.fail("re-trained a finished configuration"))
    assert main(argv) == 0
