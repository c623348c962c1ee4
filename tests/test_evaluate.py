"""evaluate.py: box, point, automatic and detector prompts, models against honest baselines, runs
scored fold by fold: the command end to end (its bad inputs: test_bad_inputs.py).

The command runs through ``main([...])`` on small crops of the real data in tests/data
with a randomly initialised MobileSAM at 256 px (``--checkpoint none --image_size 256``).
Expected values are computed here from their definitions (analytic ellipse areas, cv2
rasterisation, the folds the test itself writes), not taken from the code under test.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import SMALL, tiny_sam

from samlora.data import dataset
from samlora.data import folds as folds_lib
from samlora.evaluation.scoring import BASELINES, row_sets
from samlora.inference.yolo import Detector, DetectorOptions
from samlora.models import adapters, instance_decoder, lora
from samlora.training.runs import ModelSource

# --------------------------------------------------------------------------------------------
# fixtures: small crops of the real data (em3, em_split, untrained_yolo, main: conftest.py), adapters
# --------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nuclei_dir(shared_data, tmp_path_factory) -> Path:
    """NuInsSeg layout, two 'organs' (the cpm15 magnifications), one 192x192 H&E crop each."""
    root = tmp_path_factory.mktemp("nuclei") / "nuclei"
    for group in ("cpm15 20x", "cpm15 40x"):
        src = shared_data / "nuclei_cpm15" / group
        image_path = sorted((src / "tissue images").glob("*.png"))[0]
        labels = tifffile.imread(src / "label masks" / f"{image_path.stem}.tif")
        (root / group / "tissue images").mkdir(parents=True)
        (root / group / "label masks").mkdir(parents=True)
        cv2.imwrite(str(root / group / "tissue images" / image_path.name), cv2.imread(str(image_path))[:192, :192])
        tifffile.imwrite(root / group / "label masks" / f"{image_path.stem}.tif", labels[:192, :192])
    return root


def make_adapter(path: Path, scale: float = 0.05, seed: int = 0, decoder: bool = False, **config) -> Path:
    """A vit_t / 256 px rank-4 qkv adapter (LoRA tensors only; with ``decoder`` also a random
    instance decoder of finest width 8, attached as train --instance_decoder carries it);
    ``lora_B`` drawn with std ``scale`` (0 = the base model exactly)."""
    sam = tiny_sam("vit_t", image_size=256, seed=seed)  # the LoRA layers are TinyViT's, as in vit_t
    lora.inject_lora(sam, rank=4, alpha=4, targets="qkv")
    lora.mark_only_lora_as_trainable(sam)
    if decoder:
        torch.manual_seed(seed)
        instance_decoder.attach(sam, instance_decoder.InstanceDecoder(256, 8, 256).eval())
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for layer in lora.lora_layers(sam).values():
            layer.lora_B.copy_(scale * torch.randn(layer.lora_B.shape, generator=generator))
    values = {"model_type": "vit_t", "image_size": 256, "base_checkpoint_sha256": None, "seed": seed} | config
    return adapters.save_adapter(path, sam, values)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def test_help(main, capsys):
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model_path", "--compare", "--cv_run", "--split", "--prompt", "--visualize", "--plot",
                 "--max_objects", "--batch_prompts", "--output_dir", "--overwrite"):
        assert flag in out


@pytest.mark.slow
def test_box_prompts_end_to_end(main, nuclei_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--data_dir", str(nuclei_dir), *SMALL, "--output_dir", str(out),
                 "--plot", "--visualize", "--batch_prompts", "16"]) == 0
    rows = read_csv(out / "per_image.csv")
    for column in ("model", "kind", "image", "path", "tag", "group", "dice", "iou", "pixel_precision",
                   "pixel_recall", "aji", "aji_plus", "pq", "sq", "rq", "f1", "precision", "recall",
                   "mean_matched_iou", "f1@0.75", "n_gt", "n_pred"):
        assert column in rows[0]
    assert [r["model"] for r in rows] == ["base"] * 2 + ["baseline_box"] * 2 + ["baseline_ellipse"] * 2
    for r in rows:  # every object prompted; the baselines paste one shape per object
        assert int(r["n_prompts"]) == int(r["n_objects"]) == int(r["n_gt"]) > 0
        assert 0.0 <= float(r["dice"]) <= 1.0
    ellipse = [r for r in rows if r["model"] == "baseline_ellipse"]
    assert all(int(r["n_pred"]) <= int(r["n_gt"]) for r in ellipse)

    groups = read_csv(out / "per_group.csv")
    assert {(g["model"], g["tag"]) for g in groups} >= {("base", "cpm15 20x"), ("base", "cpm15 40x"),
                                                        ("base", "(all)"), ("baseline_box", "(all)")}
    assert {"dice_mean", "dice_std", "dice_ci_low", "dice_ci_high", "dice_pooled", "aji_pooled"} <= set(groups[0])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt"] == "box" and summary["split"] == "all" and summary["random_weights"] is True
    assert list(summary["models"]) == ["base", "baseline_box", "baseline_ellipse"]
    base = summary["models"]["base"]
    dice = base["per_image_mean"]["dice"]
    assert set(dice) == {"mean", "std", "ci_low", "ci_high", "n", "n_groups"} and dice["n"] == 2
    assert dice["ci_low"] <= dice["mean"] <= dice["ci_high"]
    per_image = [float(r["dice"]) for r in rows if r["model"] == "base"]
    assert dice["mean"] == pytest.approx(np.mean(per_image), abs=1e-5)
    pooled = {k: sum(int(r[k]) for r in rows if r["model"] == "base") for k in ("pixel_tp", "pixel_fp", "pixel_fn")}
    assert base["pooled"]["dice"] == pytest.approx(
        2 * pooled["pixel_tp"] / (2 * pooled["pixel_tp"] + pooled["pixel_fp"] + pooled["pixel_fn"]))
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 256 and config["models"] == {"base": "base"}
    log_text = (out / "evaluate.log").read_text()
    assert "with box prompts" in log_text and "Dice mean" in log_text  # the replayed start and the table
    for name in summary["files"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "comparison.png" in pngs and "plots/dice_by_tag.png" in pngs and "plots/dice_boxplot.png" in pngs
    assert len([p for p in pngs if p.startswith("visualizations/")]) == 2


@pytest.mark.slow
def test_intervals_of_patches_resample_their_source_images(main, nuclei_dir, tmp_path):
    """Two real H&E crops cut into four 96 px patches each: per_image.csv names each patch's fold
    group (its source image), and every interval of summary.json resamples those two groups."""
    from samlora.metrics.bootstrap import summarize

    out = tmp_path / "eval"
    assert main(["evaluate", "--data_dir", str(nuclei_dir), *SMALL, "--output_dir", str(out), "--patch_size", "96",
                 "--max_objects", "2", "--bootstrap", "500"]) == 0
    rows = [r for r in read_csv(out / "per_image.csv") if r["model"] == "base"]
    assert len(rows) == 8 and len({r["group"] for r in rows}) == 2
    summary = json.loads((out / "summary.json").read_text())
    base = summary["models"]["base"]
    assert base["n_groups"] == 2 and base["unit"] == summary["bootstrap"]["unit"]
    assert summary["bootstrap"]["unit"].startswith("fold groups: source images") and summary["bootstrap"]["n_groups"] == 2
    expected = summarize([float(r["dice"]) for r in rows], n_boot=500, seed=0, groups=[r["group"] for r in rows])
    assert base["per_image_mean"]["dice"] == pytest.approx(expected, abs=1e-6)
    assert {g["n_groups"] for g in read_csv(out / "per_group.csv") if g["model"] == "base"} <= {"1", "2"}


@pytest.mark.slow
def test_compare_base_and_adapter(main, em3, tmp_path):
    adapter = make_adapter(tmp_path / "adapter.pt")
    out = tmp_path / "eval"
    # --model_type / --image_size left out: taken from the adapter (vit_t, 256)
    args = ["evaluate", "--data_dir", str(em3), "--checkpoint", "none", "--device", "cpu",
            "--output_dir", str(out), "--compare", "base=base", f"lora={adapter}"]
    # an adapter outside its run: which images it trained on is unknown, so scoring them needs a flag
    assert main(args) == 2
    assert main([*args, "--split", "all", "--include_training_images"]) == 0
    rows = read_csv(out / "per_image.csv")
    assert {r["seen_in_training"] for r in rows if r["model"] == "lora"} == {"unknown"}
    assert {r["seen_in_training"] for r in rows if r["model"] != "lora"} == {"no"}
    assert len([r for r in rows if r["model"] == "base@1024"]) == 3  # zero-shot SAM at its own input size
    by_model = {m: [r for r in rows if r["model"] == m] for m in ("base", "lora", "baseline_box", "baseline_ellipse")}
    assert all(len(v) == 3 for v in by_model.values())
    assert [r["image"] for r in by_model["base"]] == [r["image"] for r in by_model["lora"]]  # same images
    assert [r["dice"] for r in by_model["base"]] != [r["dice"] for r in by_model["lora"]]  # the adapter acts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_size"] == 256 and summary["models"]["lora"]["source"] == str(adapter)
    assert (out / "comparison.png").stat().st_size > 1000


@pytest.mark.slow
def test_cross_validated_run_scores_each_fold_with_its_own_adapter(main, em3, tmp_path):
    """A run whose fold 0 adapter equals the base model: fold-0 images score exactly as base."""
    run = tmp_path / "run"
    samples = dataset.load_dataset(em3, slice_block=1)
    grouping = folds_lib.Grouping(1, fold_gap=0)  # three sections, one per fold: no room for a gap
    folds = folds_lib.make_folds(samples, 3, seed=0, grouping=grouping)
    run.mkdir()
    folds_lib.save_folds(run / "folds.json", folds, samples, seed=0, grouping=grouping)
    config = {"data_dir": str(em3), "data_format": "auto", "patch_size": 0, "patch_overlap": 0,
              "drop_empty_patches": False, "slice_block": 1, "nifti_axis": 2, "model_type": "vit_t",
              "checkpoint": "none", "image_size": 256, "seed": 0}
    (run / "config.json").write_text(json.dumps(config))
    for k in range(3):
        make_adapter(run / f"fold_{k}" / "best.pt", scale=0.0 if k == 0 else 0.05, fold=k)
    out = tmp_path / "eval"
    assert main(["evaluate", "--cv_run", str(run), "--device", "cpu", "--output_dir", str(out), "--plot",
                 "--compare", "base=base", f"cv={run}"]) == 0
    rows = read_csv(out / "per_image.csv")
    fold_of = {samples[i].key: k for k, (_, val) in enumerate(folds) for i in val}
    base = {r["image"]: r for r in rows if r["model"] == "base"}
    for r in (r for r in rows if r["model"] == "cv"):
        assert int(r["fold"]) == fold_of[r["image"]]
        same = r["dice"] == base[r["image"]]["dice"] and r["aji"] == base[r["image"]]["aji"]
        assert same == (fold_of[r["image"]] == 0)
    per_fold = read_csv(out / "per_fold.csv")
    assert {(r["model"], r["fold"]) for r in per_fold} >= {("cv", "0"), ("cv", "1"), ("cv", "2")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "val" and set(summary["per_fold"]["cv"]) == {"0", "1", "2"}
    assert (out / "plots" / "dice_by_fold.png").stat().st_size > 1000


@pytest.mark.slow
def test_point_and_auto_prompts(main, em_split, tmp_path):
    out = tmp_path / "point"
    # the data has a fixed test split: it is the default
    assert main(["evaluate", "--data_dir", str(em_split), *SMALL, "--output_dir", str(out), "--prompt", "point"]) == 0
    rows = read_csv(out / "per_image.csv")
    assert {r["model"] for r in rows} == {"base"}  # no box baselines for point prompts
    assert [r["split"] for r in rows] == ["test"]
    out = tmp_path / "auto"
    assert main(["evaluate", "--data_dir", str(em_split), *SMALL, "--output_dir", str(out), "--prompt", "auto",
                 "--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0",
                 "--split", "test", "--visualize"]) == 0
    rows = read_csv(out / "per_image.csv")
    assert len(rows) == 1 and rows[0]["n_prompts"] == "0"
    assert json.loads((out / "summary.json").read_text())["prompt"] == "amg"  # auto: the generator's alias
    assert rows[0]["mode"] == "amg" and rows[0]["model"] == "base"  # one mode: the rows keep the model's name
    assert len(list((out / "visualizations").glob("*.png"))) == 1


# --------------------------------------------------------------------------------------------
# --prompt yolo: detector boxes vs ground-truth boxes vs box-only detection masks
# --------------------------------------------------------------------------------------------
YOLO_ARGS = ["--prompt", "yolo", "--conf", "0.00001", "--max_det", "6"]


@pytest.mark.slow
def test_yolo_prompts_end_to_end(main, em3, untrained_yolo, tmp_path, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO):
        assert main(["evaluate", "--data_dir", str(em3), *SMALL, "--output_dir", str(out), *YOLO_ARGS,
                     "--yolo_model", str(untrained_yolo), "--visualize", "--max_visualize", "1"]) == 0
    rows = read_csv(out / "per_image.csv")
    names = ["base", "yolo+sam", "baseline_yolo_box", "baseline_box", "baseline_ellipse"]
    assert [r["model"] for r in rows] == [n for n in names for _ in range(3)]  # same 3 images each
    by_model = {n: {r["image"]: r for r in rows if r["model"] == n} for n in names}
    for column in ("dice", "iou", "aji", "pq", "f1", "precision", "recall", "n_pred", "seconds",
                   "det_precision", "det_recall", "det_f1", "det_tp", "det_fp", "det_fn"):
        assert column in rows[0]
    gt_boxes = {}
    for image, r in by_model["yolo+sam"].items():
        assert r["kind"] == "model" and 1 <= int(r["n_prompts"]) <= 6  # the detector's boxes, capped
        assert int(r["det_tp"]) + int(r["det_fp"]) == int(r["n_prompts"])
        assert int(r["det_tp"]) + int(r["det_fn"]) == int(r["n_objects"])
        assert 0.0 <= float(r["dice"]) <= 1.0
        filled = by_model["baseline_yolo_box"][image]  # the same boxes, filled
        assert filled["kind"] == "baseline" and filled["n_prompts"] == r["n_prompts"]
        assert [filled[k] for k in ("det_tp", "det_fp", "det_fn")] == [r[k] for k in ("det_tp", "det_fp", "det_fn")]
        assert 1 <= int(filled["n_pred"]) <= int(r["n_prompts"])
        gt = by_model["base"][image]  # ground-truth box prompts, as --prompt box scores them
        assert gt["n_prompts"] == gt["n_objects"] and gt["det_tp"] == ""
        gt_boxes[image] = int(gt["n_prompts"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt"] == "yolo" and list(summary["models"]) == names
    assert summary["models"]["yolo+sam"]["prompts"].startswith("yolo boxes")
    assert summary["models"]["base"]["prompts"] == "box"
    assert summary["models"]["baseline_yolo_box"]["kind"] == "baseline"
    detection = summary["detection"]
    assert detection["match_iou"] == 0.5 and detection["n_images"] == 3
    tp, fp, fn = (sum(int(r[f"det_{k}"]) for r in by_model["yolo+sam"].values()) for k in ("tp", "fp", "fn"))
    assert (detection["tp"], detection["fp"], detection["fn"]) == (tp, fp, fn)
    assert fn + tp == sum(gt_boxes.values())
    assert detection["precision"] == pytest.approx(tp / (tp + fp))
    assert detection["recall"] == pytest.approx(tp / (tp + fn))
    config = json.loads((out / "config.json").read_text())
    assert config["detector"]["yolo_model"] == str(untrained_yolo) and config["detector"]["imgsz"] == 128
    assert "detector boxes at IoU > 0.50" in (out / "evaluate.log").read_text()
    assert len(list((out / "visualizations").glob("*.png"))) == 1
    # the ground-truth box rows are exactly what --prompt box gives
    assert main(["evaluate", "--data_dir", str(em3), *SMALL, "--output_dir", str(tmp_path / "box")]) == 0
    boxed = {r["image"]: r for r in read_csv(tmp_path / "box" / "per_image.csv") if r["model"] == "base"}
    for image, r in by_model["base"].items():
        assert [r[k] for k in ("dice", "aji", "pq", "n_pred")] == [boxed[image][k] for k in ("dice", "aji", "pq", "n_pred")]


def test_yolo_row_names_with_several_models():
    sources = [ModelSource("base", "base"), ModelSource("lora", "adapter", Path("lora.pt"))]
    detector = Detector(None, Path("best.pt"), DetectorOptions(0.1, 0.7, 640))
    sets = row_sets("yolo", sources, BASELINES, detector)
    assert list(sets) == ["base", "yolo+base", "lora", "yolo+lora", "baseline_yolo_box", "baseline_box",
                          "baseline_ellipse"]
    assert sets["yolo+lora"].source == "lora.pt" and sets["lora"].prompts == "box"
    assert list(row_sets("yolo", sources[:1], BASELINES, detector))[:2] == ["base", "yolo+sam"]
    assert list(row_sets("box", sources[:1], BASELINES)) == ["base", "baseline_box", "baseline_ellipse"]


# --------------------------------------------------------------------------------------------
# volumes: 3-D scores beside the per-section ones
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def em_stack_dir(shared_data, tmp_path_factory) -> Path:
    """The EPFL layout with 4 consecutive real EM sections (training.tif, 192x192 crops)."""
    root = tmp_path_factory.mktemp("stack") / "stack"
    root.mkdir()
    folder = shared_data / "em_vnc_stack"
    for name in ("training", "training_groundtruth"):
        tifffile.imwrite(root / f"{name}.tif", tifffile.imread(folder / f"{name}.tif")[3:7, 128:320, 128:320],
                         photometric="minisblack")
    return root


def test_volume_scores_link_and_score_runs_of_sections(em_stack_dir) -> None:
    """reports.VolumeScores: runs of consecutive whole sections, 3-D truth = connected components
    of the foreground, predictions linked, scored by metrics.volume_metrics."""
    from scipy import ndimage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from samlora.evaluation.reports import IN_PLANE_AND_FACE, VolumeScores
    from samlora.inference.linking import link_slices
    from samlora.metrics.scores import volume_metrics

    samples = dataset.load_dataset(em_stack_dir)
    scores = VolumeScores(samples, [0, 1, 3])  # sections 0, 1 and 3: one run of two, section 3 alone
    assert [(name, run) for name, run in scores.runs] == [("training.tif[0:2]", [0, 1])]
    preds = {i: np.roll(samples[i].labels, 3, axis=1) for i in (0, 1, 3)}
    for i, pred in preds.items():
        scores.add("model", i, pred, seconds=0.5 + i)
    truth = ndimage.label(np.stack([samples[i].labels > 0 for i in (0, 1)]), IN_PLANE_AND_FACE)[0]
    linked = link_slices(np.stack([preds[0], preds[1]]))
    expected = volume_metrics(truth, linked)
    row = scores.rows(["model", "absent"])[0]
    assert row.pop("msa") == pytest.approx(msa_reference(truth, linked), abs=1e-12)  # micro-sam's mSA of 3-D objects
    assert row == {"model": "model", "volume": "training.tif[0:2]", "n_sections": 2, **expected,
                   "seconds_per_image": 1.0}  # the mean over the run's sections
    # Known without volume_metrics: the prediction is the truth's foreground rolled 3 px along x,
    # which keeps its voxel count, so Dice = |G & P| / |G| and IoU = |G & P| / (2 |G| - |G & P|).
    fg = np.stack([samples[i].labels > 0 for i in (0, 1)])
    both, size = int((fg & np.roll(fg, 3, axis=2)).sum()), int(fg.sum())
    row = scores.rows(["model"])[0]
    assert 0 < both < size
    assert row["dice"] == pytest.approx(both / size) and row["iou"] == pytest.approx(both / (2 * size - both))
    # The 3-D objects counted as 8-connected objects of each section, those that share a pixel
    # across the two sections being one: a graph of the section objects and its components.
    (a, n0), (b, n1) = (ndimage.label(section, np.ones((3, 3))) for section in fg)
    touching = np.unique(np.stack([a[fg[0] & fg[1]] - 1, n0 + b[fg[0] & fg[1]] - 1]), axis=1)
    graph = coo_matrix((np.ones(touching.shape[1]), tuple(touching)), shape=(n0 + n1, n0 + n1))
    assert row["n_gt"] == connected_components(graph, directed=False)[0] < n0 + n1


def test_volume_scores_give_the_ceiling_of_the_linked_ground_truth(em_stack) -> None:
    """A run's ground_truth_linked row (the real EM volume training.tif, 15 sections) scores the
    ground truth's own per-section 2-D components, linked with the same options, against its 3-D
    components: a perfect 2-D segmentation, whose 3-D scores the linking alone caps; with
    --link_merge the cap rises."""
    from scipy import ndimage

    from samlora.evaluation.reports import (
        GROUND_TRUTH_LINKED,
        IN_PLANE_AND_FACE,
        VolumeScores,
    )
    from samlora.inference.linking import LinkOptions, link_slices
    from samlora.metrics.scores import volume_metrics

    run = [i for i, s in enumerate(em_stack) if s.volume == "training.tif"]
    foreground = np.stack([em_stack[i].labels > 0 for i in run])
    components = np.stack([ndimage.label(section, np.ones((3, 3)))[0] for section in foreground])
    truth = ndimage.label(foreground, IN_PLANE_AND_FACE)[0]
    rows = {}
    for merge in (False, True):
        rows[merge] = VolumeScores(em_stack, run, LinkOptions(merge=merge)).rows([])
        linked = link_slices(components, merge=merge)
        expected = volume_metrics(truth, linked)
        assert rows[merge] == [{"model": GROUND_TRUTH_LINKED, "volume": "training.tif", "n_sections": len(run),
                                **expected, "msa": pytest.approx(msa_reference(truth, linked), abs=1e-12),
                                "seconds_per_image": None}]  # no segmentation was timed
    plain, merged = rows[False][0], rows[True][0]
    assert plain["dice"] == 1.0 and plain["recall50"] == 1.0  # every voxel right, every object found ...
    assert plain["n_pred"] > plain["n_gt"] and plain["ap75"] < 1.0  # ... yet objects split by the linking
    assert plain["n_gt"] < merged["n_pred"] < plain["n_pred"] and merged["ap75"] > plain["ap75"]


@pytest.mark.slow
def test_evaluate_on_a_stack_reports_3d_scores(main, em_stack_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--data_dir", str(em_stack_dir), "--split", "all", "--output_dir", str(out),
                 "--bootstrap", "10", *SMALL]) == 0
    rows = {r["model"]: r for r in csv.DictReader(open(out / "per_volume.csv"))}
    assert set(rows) == {"base", *BASELINES, "ground_truth_linked"}
    assert {r["volume"] for r in rows.values()} == {"training.tif"} and rows["base"]["n_sections"] == "4"
    summary = json.loads((out / "summary.json").read_text())
    assert "per_volume.csv" in summary["files"] and "connected components" in summary["volume_protocol"]
    assert summary["models"]["base"]["per_image_mean"]["dice"]["n"] == 4  # the 2-D scores beside
    for row in rows.values():
        assert 0.0 <= float(row["dice"]) <= 1.0 and 0.0 <= float(row["ap75"]) <= float(row["ap50"]) <= 1.0
    assert float(rows["baseline_box"]["recall50"]) > 0  # boxes of the true objects find some of them in 3-D
    assert float(rows["ground_truth_linked"]["dice"]) == 1.0 and "ground_truth_linked" in summary["volume_protocol"]
    assert json.loads((out / "config.json").read_text())["link"] == {"iou": 0.25, "gap": 1, "min_sections": 1,
                                                                     "merge": False}


def test_evaluate_refuses_the_name_of_the_ceiling_row(main, em_stack_dir, tmp_path):
    assert main(["evaluate", "--data_dir", str(em_stack_dir), "--output_dir", str(tmp_path / "eval"),
                 "--compare", "ground_truth_linked=base", *SMALL]) == 2
    assert not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------------------------
# automatic modes side by side: amg, ais, apg (the instance decoder an adapter carries)
# --------------------------------------------------------------------------------------------
AUTO_FAST = ["--points_per_side", "4", "--pred_iou_thresh", "0", "--stability_score_thresh", "0",
             "--batch_prompts", "16", "--bootstrap", "50"]
WATERSHED = {"center_distance_threshold": 0.6, "boundary_distance_threshold": 0.55, "foreground_threshold": 0.45,
             "foreground_smoothing": 1.0, "distance_smoothing": 1.6, "min_size": 5}


@pytest.mark.slow
def test_automatic_modes_side_by_side(main, em_split, tmp_path):
    """``--prompt ais,apg,amg``: a row per model and mode (NAME+MODE) with micro-sam's mSA and
    seconds in every table; ais / apg only for the adapter that carries a decoder; its watershed
    thresholds recorded; mSA equal to the definition-based reference on the rows' own labels."""
    from samlora.metrics import accuracy

    with_decoder = make_adapter(tmp_path / "dec.pt", decoder=True, watershed=WATERSHED)
    without = make_adapter(tmp_path / "plain.pt", seed=1)
    assert adapters.has_decoder(adapters.read_adapter(with_decoder)[1])
    out = tmp_path / "auto"
    assert main(["evaluate", "--data_dir", str(em_split), *SMALL, "--output_dir", str(out), "--prompt", "ais,apg,auto",
                 "--compare", f"lora={with_decoder}", f"plain={without}", *AUTO_FAST, "--visualize"]) == 0
    rows = read_csv(out / "per_image.csv")
    expected = ["lora+ais", "lora+apg", "lora+amg", "plain+amg"]  # plain has no decoder: amg only
    assert [r["model"] for r in rows] == expected
    assert [r["mode"] for r in rows] == ["ais", "apg", "amg", "amg"]
    for r in rows:
        assert 0.0 <= float(r["msa"]) <= 1.0 and float(r["seconds"]) > 0 and r["n_prompts"] == "0"
    groups = read_csv(out / "per_group.csv")
    assert {"msa_mean", "msa_ci_low", "msa_ci_high", "seconds_per_image", "dice_pooled"} <= set(groups[0])
    assert "msa_pooled" not in groups[0]  # micro-sam reports mSA as a mean over images only
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == expected and summary["prompt"] == "ais,apg,amg"
    for name, r in zip(expected, rows):
        model = summary["models"][name]
        assert model["prompts"] == r["mode"]
        assert model["per_image_mean"]["msa"]["mean"] == pytest.approx(float(r["msa"]))
        assert model["seconds_per_image"] == pytest.approx(float(r["seconds"]))
    config = json.loads((out / "config.json").read_text())
    assert config["watershed"] == {"lora": WATERSHED}  # ais / apg used the adapter's thresholds
    assert config["auto"] == {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    assert all(mode in summary["prompt_protocol"] for mode in ("ais:", "apg:", "amg:"))
    assert len(list((out / "visualizations").glob("*.png"))) == 1

    # the msa column is micro-sam's mSA of the row's labels: recompute it from its definition
    sample = dataset.load_dataset(em_split / "test")[0]
    pred = ais_labels(with_decoder, sample.image, WATERSHED)
    assert float(rows[0]["msa"]) == pytest.approx(msa_reference(sample.labels, pred), abs=1e-12)
    assert accuracy.mean_segmentation_accuracy(sample.labels, pred) == pytest.approx(float(rows[0]["msa"]), abs=1e-12)


def ais_labels(adapter: Path, image: np.ndarray, watershed: dict) -> np.ndarray:
    """The ais labels of ``image`` from the adapter on the CLI's base model (vit_t 256 px, random
    weights of the adapter's seed), through the inference layer's own path."""
    from samlora.inference import automatic
    from samlora.inference.instance_watershed import WatershedOptions

    bases = adapters.BaseModels("vit_t", None, 256)
    sam = adapters.load_finetuned(bases, adapter)
    return automatic.ais_instances(sam, image, WatershedOptions(**watershed))[0]


def msa_reference(gt: np.ndarray, pred: np.ndarray) -> float:
    """micro-sam's mSA from its definition, by brute force: at each IoU threshold t in
    np.arange(0.5, 1.0, 0.05), TP = pairs (g, p) with IoU >= t (unique for t >= 0.5 but for exact
    halves, counted greedily), FP = predictions - TP, FN = objects - TP; mean of TP / (TP + FP + FN)
    (0 where TP = 0)."""
    g_ids, p_ids = [v for v in np.unique(gt) if v], [v for v in np.unique(pred) if v]
    iou = np.zeros((len(g_ids), len(p_ids)))
    for a, g in enumerate(g_ids):
        gm = gt == g
        for b, p in enumerate(p_ids):
            pm = pred == p
            union = np.logical_or(gm, pm).sum()
            iou[a, b] = np.logical_and(gm, pm).sum() / union if union else 0.0
    values = []
    for t in np.arange(0.5, 1.0, 0.05):
        used_g, used_p, tp = set(), set(), 0
        for a, b in sorted(zip(*np.nonzero(iou >= t)), key=lambda ab: -iou[ab]):
            if a not in used_g and b not in used_p:
                used_g.add(a), used_p.add(b)
                tp += 1
        values.append(tp / (len(g_ids) + len(p_ids) - tp) if tp else 0.0)
    return float(np.mean(values))


def test_ais_on_a_model_without_decoder_is_refused(main, em_split, tmp_path, caplog):
    """ais / apg need the instance decoder: one line, exit 2, nothing written."""
    plain = make_adapter(tmp_path / "plain.pt")
    for prompt in ("ais", "apg,ais"):
        out = tmp_path / f"out_{prompt}"
        caplog.clear()
        assert main(["evaluate", "--data_dir", str(em_split), *SMALL, "--output_dir", str(out), "--prompt", prompt,
                     "--model_path", str(plain)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "no instance decoder" in errors[0] and "--instance_decoder" in errors[0]
        assert "--prompt" in errors[0] and not out.exists()


def test_a_damaged_watershed_record_is_refused(main, em_split, tmp_path, caplog):
    adapter = make_adapter(tmp_path / "dec.pt", decoder=True, watershed={"centre": 0.5})
    out = tmp_path / "out"
    assert main(["evaluate", "--data_dir", str(em_split), *SMALL, "--output_dir", str(out), "--prompt", "ais",
                 "--model_path", str(adapter)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "dec.pt" in errors[0] and "'watershed'" in errors[0] and not out.exists()


@pytest.mark.parametrize("prompt, words", [("ais,box", "only the automatic modes"), ("amg,auto", "twice"),
                                           ("ais,,amg", "empty"), ("aiss", "unknown mode")])
def test_bad_prompt_lists_are_refused(main, em_split, tmp_path, caplog, prompt, words):
    out = tmp_path / "out"
    assert main(["evaluate", "--data_dir", str(em_split), *SMALL, "--output_dir", str(out), "--prompt", prompt]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and words in errors[0] and "--prompt" in errors[0] and not out.exists()
