"""train --instance_decoder: the AIS decoder trained with the LoRA adapters on real EM crops with a
random-weight vit_t (``--checkpoint none``): the adapter holds the decoder and the chosen watershed
thresholds, metrics.csv the AIS score, resume and a frozen encoder work, the loss reaches the
decoder (the learning proof: test_learning.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from main import main
from samlora.inference.instance_watershed import WatershedOptions
from samlora.models import adapters, instance_decoder
from samlora.training import ais

pytestmark = pytest.mark.slow  # every test here trains

AIS = ["--instance_decoder", "--epochs", "2", "--augment_variants", "1"]


@pytest.fixture(autouse=True)
def small_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder of micro-sam's layout at 1/8 of its widths (8..64 channels): the full one costs
    ~10 s per 256 px step on a shared CPU. Its state still loads by its shapes (decoder_from_state)."""
    monkeypatch.setattr(ais, "new_decoder", lambda size: instance_decoder.InstanceDecoder(initial_features=8,
                                                                                          image_size=size))


def run_train(data_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data_dir", str(data_dir), "--output_dir", str(out), *TINY_TRAIN, *AIS, *extra])


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_flags_parse_and_are_checked(tmp_path: Path, em6: Path) -> None:
    from samlora.training.config import TrainConfig

    config = TrainConfig(data_dir="", output_dir="", instance_decoder=True, instance_loss_weight=0.5)
    config.validate()
    assert main(["train", "--data_dir", str(em6), "--output_dir", str(tmp_path / "x"), *TINY_TRAIN,
                 "--instance_loss_weight", "0"]) == 2
    assert not (tmp_path / "x").exists()


def test_adapter_holds_decoder_and_watershed(em6: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run_train(em6, out) == 0
    config, state = adapters.read_adapter(out / "fold_0" / "best.pt")
    assert adapters.has_decoder(state)
    assert set(config[ais.WATERSHED_KEY]) == set(WatershedOptions.__dataclass_fields__)
    assert ais.watershed_of(config) in ais.grid_options()
    rows = metrics(out)
    assert len(rows) == 2 and all(0 <= float(r["val_ais_msa"]) <= 1 and float(r["train_ais_loss"]) > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    fold = summary["folds"][0]
    assert fold["watershed"] == config[ais.WATERSHED_KEY]
    assert all(0 <= s["ais_msa"] <= 1 for s in fold["scored"])
    cv = summary["cv_estimate"]
    assert cv["ais_msa"]["mean"] == pytest.approx(np.mean([s["ais_msa"] for s in fold["scored"]]))
    assert cv["per_fold"][0]["ais_msa"] == pytest.approx(cv["ais_msa"]["mean"])


def test_frozen_encoder_and_resume(em6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--freeze_encoder (the embedding cache feeds the decoder); --resume restores the decoder
    and its optimiser state and ends as an uninterrupted run."""
    from samlora.training import trainer

    flags = ["--freeze_encoder", "--lora_targets", "decoder"]
    full = tmp_path / "full"
    assert run_train(em6, full, *flags) == 0
    part = tmp_path / "part"
    original = trainer.run_epoch
    calls = []

    def stop_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "run_epoch", stop_after_first)
    assert run_train(em6, part, *flags) != 0  # interrupted after the first epoch
    monkeypatch.setattr(trainer, "run_epoch", original)
    saved = torch.load(part / "fold_0" / "last.pt", weights_only=True)
    assert any(k.startswith(instance_decoder.PREFIX) for k in saved["trainable"])
    assert run_train(em6, part, *flags, "--resume") == 0
    a = adapters.read_adapter(full / "fold_0" / "best.pt")[1]
    b = adapters.read_adapter(part / "fold_0" / "best.pt")[1]
    for key in a:
        if key.startswith(instance_decoder.PREFIX):
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert [r["val_ais_msa"] for r in metrics(full)] == [r["val_ais_msa"] for r in metrics(part)]


def test_decoder_gets_gradients(em6: Path) -> None:
    """One step: every decoder parameter gets a finite, non-zero gradient from the AIS loss."""
    from samlora.data import dataset as data
    from samlora.training import items, trainer
    from samlora.training.config import TrainConfig

    config = TrainConfig(data_dir=str(em6), output_dir="", model_type="vit_t", checkpoint=None, image_size=256,
                         max_objects=2, lora_rank=4, lora_alpha=4, instance_decoder=True, sub_iterations=1)
    samples = data.read_samples(em6, config)
    sam, _ = trainer.build_trainable_model(config, None, torch.device("cpu"))
    decoder = instance_decoder.attached(sam)
    assert decoder is not None and all(p.requires_grad for p in decoder.parameters())
    assert {id(p) for p in decoder.parameters()} <= {id(p) for g in trainer.param_groups(sam, 0.01) for p in g["params"]}
    ctx = trainer.Context(sam, config, torch.device("cpu"), rounds=1)
    trainer.set_train_mode(sam)
    assert decoder.training
    item = items.PromptDataset(samples, [0], config, 0, train=True)[0]
    assert item.instance_targets is not None and item.instance_targets.shape == (3, *item.labels.shape)
    loss, _, finite = trainer.backward_step(ctx, [item])
    assert finite and loss is not None and ctx.ais_losses and ctx.ais_losses[0] > 0
    grads = [p.grad for p in decoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
