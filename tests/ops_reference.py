"""Slow, obviously-correct float64 references shared by the tests of jfcnn.ops.

Imported as a top-level module (`import ops_reference`): pytest puts `tests/`
on the path (`pythonpath` in pyproject.toml).
"""

from __future__ import annotations

import numpy as np


def iou_pair(a, b) -> float:
    """IoU of two boxes `(x1, y1, x2, y2)`; 0 for an empty union.

    Computed in the boxes' own precision: pass float64 (as `nms_loop` does).
    """
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_loop(boxes, scores, iou_threshold, valid=None, class_ids=None) -> list[int]:
    """Greedy NMS one box at a time (torchvision semantics), float64.

    Best score first (ties by index); a box is kept unless it overlaps a kept
    box of its class by IoU `> iou_threshold`. Invalid boxes and `-inf` scores
    are never kept. Returns the kept indices in order.
    """
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    class_ids = np.zeros(n, int) if class_ids is None else np.asarray(class_ids)
    order = [i for i in range(n) if valid[i] and scores[i] > -np.inf]
    order.sort(key=lambda i: -scores[i])  # Python's sort is stable: ties by index
    keep = []
    for i in order:
        if all(
            class_ids[k] != class_ids[i] or iou_pair(boxes[i], boxes[k]) <= iou_threshold
            for k in keep
        ):
            keep.append(i)
    return keep
