"""figures.py: instance contours and label edges, bars and box plots (every figure a real PNG)."""
from __future__ import annotations

import numpy as np

from samlora.core import figures


def test_draw_instances_colours_each_contour(tmp_path):
    image = np.full((50, 60, 3), 128, np.uint8)
    labels = np.zeros((50, 60), np.int32)
    labels[10:20, 10:20] = 5
    labels[25:45, 30:55] = 9
    drawn = figures.draw_instances(image, labels, thickness=1, fill_alpha=0)
    colors = figures.instance_colors(np.array([5, 9]))
    assert (drawn[10, 15] == colors[0]).all() and (drawn[25, 40] == colors[1]).all()  # edges
    assert (drawn[15, 15] == 128).all() and (drawn[0, 0] == 128).all()  # interior, background
    assert not np.array_equal(colors[0], colors[1])
    assert figures.with_warning("Dice", True).startswith(figures.RANDOM_WEIGHTS)
    path = figures.save_side_by_side(tmp_path / "a.png", image, [figures.Panel("image"),
                                     figures.Panel("gt", labels)], "title", random_weights=True)
    assert path.stat().st_size > 1000
    cell = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 3}
    bars = figures.save_grouped_bars(tmp_path / "b.png", {"tag": {"base": cell, "baseline_box": cell}},
                                     "Dice", "t", baselines=["baseline_box"])
    box = figures.save_box_plot(tmp_path / "c.png", {"base": [0.1, 0.5, 0.7]}, "Dice", "t")
    assert bars.stat().st_size > 1000 and box.stat().st_size > 1000


def test_label_edges_match_3x3_filters():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 6), (6, 1), (7, 9), (40, 33)]:
        labels = rng.integers(0, 4, shape).astype(np.int32)
        expected = (labels != ndimage.maximum_filter(labels, 3)) | (labels != ndimage.minimum_filter(labels, 3))
        np.testing.assert_array_equal(figures.label_edges(labels), expected)


def test_search_figures(tmp_path):
    points = [(0, 0.31, "complete", "rank2_alpha2_lr0.001"), (1, 0.2, "pruned", "rank4_alpha2_lr0.001"),
              (2, 0.35, "complete", "rank8_alpha2_lr0.001")]
    history = figures.save_search_history(tmp_path / "history.png", points, "search", random_weights=True)
    importance = figures.save_importance(tmp_path / "importance.png", {"learning_rate": 0.7, "lora_rank": 0.3,
                                                                       "lora_alpha": 0.0}, "t", fixed=["lora_alpha"])
    assert history.stat().st_size > 1000 and importance.stat().st_size > 1000
