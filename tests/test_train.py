"""train: end-to-end runs on real EM crops with random-weight models (``--checkpoint none``): folds,
resume, the frozen-encoder cache, the merged export, a NaN loss, torchrun; cross-validation, resume,
the merged export and torchrun also with late LoRA (``--lora_blocks last2``: vit_t's last stage, its
input cached) (bad input: test_bad_inputs.py; the losses: test_losses.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, count_encoder_calls

from main import main
from samlora.models import adapters
from samlora.training import trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here trains (em6: six 256 px crops of real EM sections, conftest.py)


def run_train(data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *TINY_TRAIN, *extra])


def test_cross_validation_writes_every_file(em6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With late LoRA: the frozen blocks run once per image view for the whole run (all folds)."""
    from samlora.models import encoder_blocks

    frozen_passes: list[int] = []
    original = encoder_blocks.run_to_block
    monkeypatch.setattr(encoder_blocks, "run_to_block",
                        lambda enc, images, block: (frozen_passes.append(len(images)), original(enc, images, block))[1])
    out = tmp_path / "run"
    assert run_train(em6, out, "--cross_validation", "--num_folds", "3", "--epochs", "2", "--lora_blocks", "last2") == 0
    assert 6 <= sum(frozen_passes) <= 6 * 2  # 6 images, 2 augmentation views each, over 3 folds x 2 epochs
    for name in ("config.json", "folds.json", "metrics.csv", "summary.json", "train.log"):
        assert (out / name).is_file(), name
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("fold,epoch,train_loss")
    assert len(rows) == 1 + 3 * 2
    summary = json.loads((out / "summary.json").read_text())
    dices = [s["dice"] for f in summary["folds"] for s in f["scored"]]  # every outer image once
    assert len(dices) == 6 and all(0 <= d <= 1 for d in dices)
    cv = summary["cv_estimate"]
    assert cv["n_images"] == 6 and cv["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert cv["dice"]["std"] == pytest.approx(np.std(dices, ddof=1))
    assert cv["dice"]["ci_low"] <= cv["dice"]["mean"] <= cv["dice"]["ci_high"]
    folds = json.loads((out / "folds.json").read_text())["folds"]
    for fold in folds:  # grouped: no image on both sides
        assert not set(fold["train_groups"]) & set(fold["val_groups"])
    for k in range(3):
        adapter = out / f"fold_{k}" / "best.pt"
        assert adapter.is_file() and adapter.stat().st_size < 2_000_000  # adapter only, not a model
        saved = torch.load(adapter, weights_only=True)
        assert saved["config"]["blocks"] == [8, 9]
        assert all(k.startswith("image_encoder.layers.3.") for k in saved["state_dict"] if "lora_" in k)
        assert (out / f"fold_{k}" / "last.pt").is_file()
    # a second run into the same directory is refused, and nothing is lost
    before = (out / "summary.json").read_bytes()
    assert run_train(em6, out, "--cross_validation", "--num_folds", "3", "--epochs", "2") == 2
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.parametrize("blocks", ["all", "last2"])
def test_resume_after_interruption_matches_uninterrupted(em6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        blocks: str) -> None:
    args = ("--epochs", "3", "--lora_dropout", "0.1", "--prompt", "mix", "--lora_blocks", blocks)
    assert run_train(em6, tmp_path / "full", *args) == 0

    original = trainer.train_one_epoch

    def interrupted(ctx, loader, epoch, fold, limit=None):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(ctx, loader, epoch, fold, limit=limit)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    assert run_train(em6, tmp_path / "cut", *args) == 130
    assert not (tmp_path / "cut" / "summary.json").exists()
    monkeypatch.setattr(trainer, "train_one_epoch", original)
    assert run_train(em6, tmp_path / "cut", *args, "--resume") == 0

    full = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    cut = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # drop the seconds column
    assert strip(full) == strip(cut)
    a = torch.load(tmp_path / "full" / "fold_0" / "last.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "cut" / "fold_0" / "last.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_encoder_embeds_each_image_once(em6: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_encoder_calls(monkeypatch)
    out = tmp_path / "frozen"
    assert run_train(em6, out, "--freeze_encoder", "--lora_targets", "decoder", "--epochs", "3",
                     "--no_augment") == 0
    # 6 images, each embedded exactly once over 3 epochs of training and validation
    assert sum(calls) == 6
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4

    # cross-validation: every image is in some fold's training and another's validation set,
    # and the frozen encoder still runs once per image for the whole run, not once per fold
    calls.clear()
    assert run_train(em6, tmp_path / "frozen_cv", "--freeze_encoder", "--lora_targets", "decoder",
                     "--epochs", "1", "--no_augment", "--cross_validation", "--num_folds", "3") == 0
    assert sum(calls) == 6


def test_export_merged_loads_in_the_official_registry(em6: Path, tmp_path: Path) -> None:
    """A late adapter (vit_t's last stage) merged into a plain MobileSAM state dict: the official
    registry loads it and segments as our unmerged model with the adapter does."""
    import mobile_sam

    from samlora.inference.segmenter import predict
    from samlora.models import lora
    from samlora.models.sam import build_model, import_mobile_sam_modeling

    out, export = tmp_path / "run", tmp_path / "merged.pt"
    assert run_train(em6, out, "--epochs", "1", "--learning_rate", "1e-2", "--lora_blocks", "last2",
                     "--export_merged", str(export)) == 0
    import_mobile_sam_modeling()
    official = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(export)).eval()
    # ours: the same random base (seed 0) with the adapter, unmerged
    torch.manual_seed(0)
    ours = build_model("vit_t").sam
    adapters.load_adapter(out / "final" / "best.pt", ours)  # --export_merged exports the final fit
    assert {name.split(".blocks.")[0] for name in lora.lora_layers(ours)} == {"image_encoder.layers.3"}
    adapter_changed = any(v.abs().sum() > 0 for k, v in lora.lora_state_dict(ours).items() if "lora_B" in k)
    assert adapter_changed
    image = cv2.cvtColor(cv2.imread(str(em6 / "images" / "a.png")), cv2.COLOR_BGR2RGB)
    box = np.array([[40, 40, 120, 140]])
    with torch.no_grad():
        m1, s1, l1 = predict(ours.eval(), image, boxes=box)
        m2, s2, l2 = predict(official, image, boxes=box)
    assert np.abs(l1 - l2).max() < 1e-3
    assert (m1 != m2).mean() < 1e-3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(em6: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    original = trainer.object_losses
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        losses, best = original(*args)
        return (losses * float("nan") if calls["n"] > 5 else losses), best  # 5 images = epoch 0 of fold 0

    monkeypatch.setattr(trainer, "object_losses", poisoned)
    out = tmp_path / "nan"
    assert run_train(em6, out, "--epochs", "3", "--decoder_chunk", "1000", "--sub_iterations", "1") == 2  # a loss per image
    assert "loss became nan" in caplog.text
    saved = torch.load(out / "fold_0" / "last.pt", weights_only=True)
    assert saved["state"]["epoch"] == 0  # epoch 0 kept; the poisoned epoch 1 was not saved
    assert all(torch.isfinite(v).all() for v in saved["trainable"].values())


def test_torchrun_two_processes_on_cpu(em6: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "main.py"), "train", "--data_dir", str(em6), "--output_dir", str(out), *TINY_TRAIN,
           "--epochs", "2", "--device", "cpu", "--lora_blocks", "last2"]  # late LoRA: each process caches
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["folds"]) == 1 and 0 <= summary["cv_estimate"]["dice"]["mean"] <= 1
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # one writer (rank 0): header + 2 epochs, no duplicates
    assert torch.load(out / "fold_0" / "best.pt", weights_only=True)["config"]["blocks"] == [8, 9]
