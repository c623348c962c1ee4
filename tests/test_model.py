"""model.py: equivalence with the official SAM / MobileSAM predictors, input sizes, the one forward,
prompt and image checks (reading checkpoints: test_checkpoints.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny_sam

from samlora.core.errors import UserError
from samlora.inference.segmenter import predict
from samlora.models.sam import (
    build_model,
    encode_images,
    import_mobile_sam_modeling,
    make_prompts,
    prepare_image,
    sam_forward,
)

log = logging.getLogger(__name__)


def real_image_and_labels(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """A non-square H&E tile (392x459 or so) and its instance labels, to exercise resize/crop."""
    group = shared_data / "nuclei_cpm15" / "cpm15 20x"
    image_path = sorted((group / "tissue images").glob("*.png"))[0]
    label_path = group / "label masks" / (image_path.stem + ".tif")
    image = cv2.cvtColor(cv2.imread(str(image_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return image, tifffile.imread(label_path)


def prompts_from_labels(labels: np.ndarray, n: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (nx4) of the n largest objects, and one fg + one bg point per object (nx2x2)."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    boxes, points = [], []
    for obj in ids[np.argsort(-counts)][:n]:
        ys, xs = np.nonzero(labels == obj)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
        k = len(xs) // 2
        points.append([[xs[k], ys[k]], [max(xs.min() - 3, 0), max(ys.min() - 3, 0)]])
    return np.array(boxes, np.float32), np.array(points, np.float32), np.array([[1, 0]] * len(boxes))


def reference_predictor(model_type: str, ours: torch.nn.Module):
    """The official predictor on a model built by the official registry with our weights."""
    if model_type == "vit_t":
        import mobile_sam

        import_mobile_sam_modeling()
        reference = mobile_sam.sam_model_registry["vit_t"]()
        predictor_cls = mobile_sam.SamPredictor
    else:
        import segment_anything

        reference = segment_anything.sam_model_registry[model_type]()
        predictor_cls = segment_anything.SamPredictor
    reference.load_state_dict(ours.state_dict(), strict=True)  # our keys are the official ones
    return predictor_cls(reference.eval())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_t", "vit_b"])
def test_predict_matches_official_predictor(model_type: str, shared_data: Path) -> None:
    torch.manual_seed(0)
    sam = build_model(model_type, checkpoint=None, image_size=1024).sam
    image, labels = real_image_and_labels(shared_data)
    boxes, points, point_labels = prompts_from_labels(labels)

    predictor = reference_predictor(model_type, sam)
    predictor.set_image(image)
    with torch.no_grad():
        embedding = encode_images(sam, prepare_image(image, 1024).tensor[None])
    # Our encoder on our pre-processing gives the official features.
    assert torch.allclose(embedding, predictor.features, atol=1e-5, rtol=0)

    cases = {
        "box": dict(boxes=boxes[:1]),
        "points": dict(points=points[0], point_labels=point_labels[0]),
        "box+points": dict(boxes=boxes[:1], points=points[:1], point_labels=point_labels[:1]),
        "multimask": dict(points=points[0][:1], point_labels=point_labels[0][:1], multimask_output=True),
    }
    worst = 0.0
    for name, kwargs in cases.items():
        multimask = kwargs.pop("multimask_output", False)
        ref_kwargs = {"box": kwargs.get("boxes", [None])[0], "multimask_output": multimask,
                      "point_coords": kwargs.get("points"), "point_labels": kwargs.get("point_labels")}
        if ref_kwargs["point_coords"] is not None and ref_kwargs["point_coords"].ndim == 3:
            ref_kwargs["point_coords"], ref_kwargs["point_labels"] = points[0], point_labels[0]
        ref_masks, ref_scores, ref_low = predictor.predict(**ref_kwargs)
        ref_logits, _, _ = predictor.predict(**ref_kwargs, return_logits=True)

        masks, scores, low = predict(sam, image, multimask_output=multimask, image_embedding=embedding, **kwargs)
        if name == "box":  # the full path (pre-processing + encoder) agrees with the cached one
            masks_full, _, low_full = predict(sam, image, multimask_output=multimask, **kwargs)
            np.testing.assert_array_equal(masks_full, masks)
            assert np.abs(low_full - low).max() < 1e-5

        prompts = make_prompts(image.shape[:2], 1024, **kwargs)
        prepared = prepare_image(image, 1024)
        with torch.no_grad():
            out = sam_forward(sam, None, [prompts], [prepared.input_size], [prepared.original_size],
                              multimask, image_embeddings=embedding)[0]
        logits = out.logits[0].numpy()
        diff = max(np.abs(logits - ref_logits).max(), np.abs(low.reshape(ref_low.shape) - ref_low).max(),
                   np.abs(scores.reshape(ref_scores.shape) - ref_scores).max())
        worst = max(worst, float(diff))
        assert diff < 1e-4, f"{model_type} {name}: max abs difference {diff}"
        np.testing.assert_array_equal(masks.reshape(ref_masks.shape), ref_masks)
        assert masks.shape[-2:] == image.shape[:2]
        # the masks are not trivially empty or full, so agreement is informative
        assert 0 < ref_masks.mean() < 1, f"{name}: degenerate reference mask"
    log.info("%s: worst max abs difference to the official predictor %.2e", model_type, worst)
    print(f"{model_type}: worst max abs logit difference vs official predictor = {worst:.2e}")


@pytest.mark.parametrize("model_type", ["vit_t", "vit_b"])
@pytest.mark.parametrize("image_size", [512, 256])
def test_reduced_input_sizes(model_type: str, image_size: int) -> None:
    sam = build_model(model_type, image_size=image_size).sam
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    masks, scores, low = predict(sam, image, boxes=np.array([[10, 20, 100, 150], [0, 0, 299, 199]]))
    assert masks.shape == (2, 200, 300) and masks.dtype == bool
    assert scores.shape == (2,)
    assert low.shape == (2, image_size // 4, image_size // 4)


def test_forward_is_differentiable_and_batched() -> None:
    sam = tiny_sam("vit_t", image_size=256)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (120, 90, 3), dtype=np.uint8), rng.integers(0, 255, (64, 200, 3), dtype=np.uint8)]
    prepared = [prepare_image(im, 256) for im in images]
    prompts = [make_prompts(p.original_size, 256, boxes=np.array([[5, 5, 40, 60]] * (i + 1)))
               for i, p in enumerate(prepared)]
    batch = torch.stack([p.tensor for p in prepared])
    outs = sam_forward(sam, batch, prompts, [p.input_size for p in prepared], [p.original_size for p in prepared])
    assert [o.low_res.shape[0] for o in outs] == [1, 2]
    assert outs[1].logits.shape == (2, 1, 64, 200)
    loss = sum(o.low_res.sum() + o.iou.sum() for o in outs)
    loss.backward()
    grads = [p.grad for p in sam.image_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_unknown_model_type() -> None:
    with pytest.raises(UserError, match="unknown model type"):
        build_model("vit_x")


def test_prompt_validation() -> None:
    with pytest.raises(ValueError, match="disagree"):
        make_prompts((100, 100), 256, boxes=np.zeros((2, 4)), points=np.zeros((3, 1, 2)), point_labels=np.ones((3, 1)))
    with pytest.raises(ValueError, match="no prompt"):
        make_prompts((100, 100), 256)
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(np.zeros((10, 10), np.uint8), 256)
