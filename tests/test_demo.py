"""``python main.py demo`` on the real samples shipped in samples/, and the samples themselves.

Random weights at 256 px keep it fast (``--checkpoint none --image_size 256``); the expected box
baseline Dice is computed here from the mask files with cv2, not by the code under test. Bad
input (missing weights, a foreign output directory, ...): test_bad_inputs.py.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from conftest import tiny_sam

import demo
from samlora.core import figures
from samlora.models import adapters, lora

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
FAST = ["--checkpoint", "none", "--image_size", "256", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `one_thread`, `main`: conftest.py


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every figure the demo draws: its kind, title, panel titles and random-weights flag."""
    calls: list[dict] = []
    side_by_side, bars = figures.save_side_by_side, figures.save_grouped_bars

    def spy_side(path, image, panels, title, random_weights=False, **kwargs):
        calls.append({"kind": "sample", "path": Path(path), "title": title, "random_weights": random_weights,
                      "panels": [p.title for p in panels]})
        return side_by_side(path, image, panels, title, random_weights, **kwargs)

    def spy_bars(path, table, ylabel, title, random_weights=False, baselines=(), **kwargs):
        calls.append({"kind": "summary", "path": Path(path), "title": title, "random_weights": random_weights,
                      "table": table})
        return bars(path, table, ylabel, title, random_weights, baselines, **kwargs)

    monkeypatch.setattr(figures, "save_side_by_side", spy_side)
    monkeypatch.setattr(figures, "save_grouped_bars", spy_bars)
    return calls


def box_baseline_dice(mask_path: Path) -> float:
    """Dice of the filled bounding boxes of a mask's objects against the mask (cv2 only)."""
    if mask_path.suffix == ".tif":
        mask = tifffile.imread(mask_path)
    else:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    if len(np.unique(mask)) <= 2:  # binary: objects are the 8-connected components
        _, mask = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
    boxes = np.zeros(mask.shape, bool)
    for value in np.unique(mask[mask > 0]):
        ys, xs = np.nonzero(mask == value)
        boxes[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    truth = mask > 0
    return 2 * np.count_nonzero(boxes & truth) / (np.count_nonzero(boxes) + np.count_nonzero(truth))


def test_samples_are_small_real_and_documented() -> None:
    """The shipped samples: EM and nuclei, every image with its mask, < 2 MB, provenance given."""
    files = [p for p in SAMPLES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    for kind in ("em", "nuclei"):
        images = sorted(p.stem for p in (SAMPLES / kind / "images").iterdir())
        masks = sorted(p.stem for p in (SAMPLES / kind / "masks").iterdir())
        assert images and images == masks
    readme = (SAMPLES / "README.md").read_text(encoding="utf-8")
    for words in ("CC BY-NC-SA 3.0", "doi:10.6084/m9.figshare.856713", "MoNuSeg", "CC BY-NC-SA 4.0"):
        assert words in readme
    for image in (SAMPLES / "em" / "images").iterdir():  # every crop is named in the README
        assert image.stem in readme


@pytest.mark.slow
def test_demo_with_random_weights_writes_every_figure(main, drawn: list[dict], tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", *FAST, "--output_dir", str(out)]) == 0
    samples = demo.load_samples(SAMPLES)
    assert len(samples) == 5 and {s.tag for s in samples[:2]} == {"em", "nuclei"}  # interleaved
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(samples) + 1 and "summary.png" in pngs
    for name in pngs:
        picture = cv2.imread(str(out / name))
        assert picture is not None and picture.shape[1] >= 500 and picture.std() > 10, name
    for name in ("dice.csv", "summary.json", "config.json", "demo.log"):
        assert (out / name).is_file(), name
    # every figure says RANDOM WEIGHTS; a sample figure is image | ground truth | base SAM
    assert len(drawn) == len(samples) + 1 and all(call["random_weights"] for call in drawn)
    for call in (c for c in drawn if c["kind"] == "sample"):
        assert call["panels"][0] == "image" and call["panels"][1].startswith("ground truth")
        assert call["panels"][2].startswith("base SAM: Dice ") and len(call["panels"]) == 3
    rows = list(csv.DictReader((out / "dice.csv").open(encoding="utf-8")))
    assert len(rows) == 2 * len(samples)  # base SAM and the box baseline
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    for r in (r for r in rows if r["model"] == "box baseline"):  # checked against cv2's own count
        kind = "em" if r["tag"] == "em" else "nuclei"
        mask = next((SAMPLES / kind / "masks").glob(Path(r["image"]).stem + ".*"))
        assert float(r["dice"]) == pytest.approx(box_baseline_dice(mask), abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["random_weights"] is True and set(summary["mean_dice"]) == {"base SAM", "box baseline"}
    log_text = (out / "demo.log").read_text()
    assert "RANDOM WEIGHTS" in log_text and "mean Dice" in log_text


@pytest.mark.slow
def test_demo_refuses_to_overwrite_and_overwrites_when_asked(main, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "demo"
    argv = ["demo", *FAST, "--output_dir", str(out), "--num_samples", "2"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    caplog.clear()
    assert main(argv) == 2
    assert "holds an earlier `demo` run" in caplog.text and "--overwrite" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["demo", *FAST, "--output_dir", str(out), "--num_samples", "1", "--overwrite"]) == 0
    assert len(list(out.glob("*.png"))) == 2  # the earlier second figure went with its run


@pytest.mark.slow
def test_demo_with_an_untrained_adapter_matches_the_base(main, drawn: list[dict], tmp_path: Path) -> None:
    """A fresh adapter (lora_B = 0) changes nothing: the fine-tuned panel equals the base one."""
    sam = tiny_sam("vit_t", image_size=256)  # the adapter holds TinyViT's qkv LoRA tensors only
    lora.inject_lora(sam, 2, 2, ("qkv",))
    lora.mark_only_lora_as_trainable(sam)
    adapter = adapters.save_adapter(tmp_path / "best.pt", sam, {"model_type": "vit_t", "image_size": 256, "seed": 0})
    out = tmp_path / "demo"
    assert main(["demo", "--checkpoint", "none", "--device", "cpu", "--model_path", str(adapter),
                 "--output_dir", str(out), "--num_samples", "1"]) == 0  # the image size comes from the adapter
    panels = drawn[0]["panels"]
    assert len(panels) == 4 and panels[3].startswith("fine-tuned: Dice ")
    assert panels[2].split("Dice ")[1] == panels[3].split("Dice ")[1]
    assert json.loads((out / "config.json").read_text())["image_size"] == 256


def test_demo_help(main, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model_path", "--num_samples", "--output_dir", "--overwrite", "--checkpoint"):
        assert flag in text


def test_every_sample_of_a_stack_has_a_name_of_its_own(em_stack) -> None:
    names = [demo.sample_name(s) for s in em_stack]
    assert len(set(names)) == len(names)
