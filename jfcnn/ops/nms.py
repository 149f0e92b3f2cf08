"""Static-shape non-maximum suppression (NMS).

Both functions return a fixed number of indices plus a validity mask, so they
jit once and ``vmap`` over a batch of images. The result equals greedy NMS as
in ``torchvision.ops.nms``: boxes are visited in descending score order (equal
scores in index order), and a box is dropped when its IoU with an already kept
box is strictly greater than ``iou_threshold``.

How: sort once, then walk the sorted boxes in tiles of ``tile_size``. Each
tile is first suppressed by the (at most ``max_output``) boxes kept so far,
in ``(tile_size, tile_size)`` IoU blocks, then by itself, solving the
greedy recurrence ``keep[i] = candidate[i] and no kept j < i overlaps i`` by
fixed-point iteration on a ``(tile_size, tile_size)`` overlap matrix. The loop
stops as soon as ``max_output`` boxes are kept or the valid boxes run out. The
work is O(N * (max_output + tile_size)) and is done in large dense blocks (TF's
``non_max_suppression_padded`` uses the same tiling), which suits CPU, GPU and
TPU better than one sequential step per box.

Dimension letters used in the docstrings:

* ``N``: number of input boxes.
* ``K``: ``max_output``, the number of returned slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jfcnn.ops.boxes import box_iou

DEFAULT_TILE_SIZE = 256


def _check_inputs(boxes, scores, valid, class_ids, max_output, tile_size):
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
    num_boxes = boxes.shape[0]
    if scores.shape != (num_boxes,):
        raise ValueError(f"scores must have shape (N,) = ({num_boxes},), got {scores.shape}")
    if valid is not None and valid.shape != (num_boxes,):
        raise ValueError(f"valid must have shape (N,) = ({num_boxes},), got {valid.shape}")
    if class_ids is not None and class_ids.shape != (num_boxes,):
        raise ValueError(f"class_ids must have shape (N,) = ({num_boxes},), got {class_ids.shape}")
    if not isinstance(max_output, int) or max_output < 1:
        raise ValueError(f"max_output must be a positive Python int, got {max_output!r}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive Python int, got {tile_size!r}")


def _nms(boxes, scores, iou_threshold, max_output, valid, class_ids, tile_size):
    """Shared implementation; ``class_ids=None`` means one class."""
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    valid = None if valid is None else jnp.asarray(valid)
    class_ids = None if class_ids is None else jnp.asarray(class_ids)
    _check_inputs(boxes, scores, valid, class_ids, max_output, tile_size)
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((max_output,), bool)

    candidate = scores > -jnp.inf  # also False for NaN scores
    if valid is not None:
        candidate &= valid.astype(bool)

    # Stable sort on the negated score: descending, equal scores in index
    # order (torchvision's order), and non-candidates moved to the end so the
    # walk can stop at the first of them.
    sort_key = jnp.where(candidate, -scores, jnp.inf)
    order = jnp.argsort(sort_key, stable=True).astype(jnp.int32)

    tile = min(tile_size, num_boxes)
    num_tiles = -(-num_boxes // tile)
    padded = num_tiles * tile
    pad = padded - num_boxes
    sorted_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    sorted_candidate = jnp.pad(candidate[order], (0, pad))
    sorted_index = jnp.pad(order, (0, pad), constant_values=-1)
    if class_ids is not None:
        sorted_class = jnp.pad(class_ids[order], (0, pad))

    # Earlier box (row) may suppress a later box (column) of the same tile.
    earlier = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]
    slot = jnp.arange(max_output)
    # The kept buffer holds whole tiles so it can be read block by block.
    buffer_size = -(-max_output // tile) * tile

    def tile_body(state):
        t, count, kept_boxes, kept_class, kept_index = state
        start = t * tile
        tile_boxes = lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
        tile_candidate = lax.dynamic_slice_in_dim(sorted_candidate, start, tile)
        tile_index = lax.dynamic_slice_in_dim(sorted_index, start, tile)

        if class_ids is not None:
            tile_class = lax.dynamic_slice_in_dim(sorted_class, start, tile)

        # 1. Suppression by the boxes kept so far, one (tile, tile) block of
        # the kept buffer at a time, visiting only the filled blocks: while
        # few boxes are kept (clustered inputs) this is most of the saving.
        def prev_body(j_suppressed):
            j, suppressed = j_suppressed
            block_start = j * tile
            block_boxes = lax.dynamic_slice_in_dim(kept_boxes, block_start, tile)
            filled = block_start + jnp.arange(tile) < count
            overlap = (box_iou(tile_boxes, block_boxes) > iou_threshold) & filled[None]
            if class_ids is not None:
                block_class = lax.dynamic_slice_in_dim(kept_class, block_start, tile)
                overlap &= tile_class[:, None] == block_class[None, :]
            return j + 1, suppressed | jnp.any(overlap, axis=1)

        num_filled_blocks = (count + tile - 1) // tile
        init_prev = (jnp.array(0, jnp.int32), jnp.zeros((tile,), bool))
        _, suppressed = lax.while_loop(lambda js: js[0] < num_filled_blocks, prev_body, init_prev)
        tile_candidate &= ~suppressed

        # 2. Suppression within the tile.
        overlap_self = (box_iou(tile_boxes, tile_boxes) > iou_threshold) & earlier
        if class_ids is not None:
            overlap_self &= tile_class[:, None] == tile_class[None, :]

        # Greedy NMS within the tile is the unique solution of
        # keep[i] = candidate[i] & ~any_j(keep[j] & overlap_self[j, i]) since
        # overlap_self only points forward. Jacobi iteration from
        # keep = candidate settles one more leading box per sweep at least, so
        # it ends within `tile` sweeps; clustered boxes take only a few.
        def sweep(keep_changed):
            keep, _ = keep_changed
            new_keep = tile_candidate & ~jnp.any(overlap_self & keep[:, None], axis=0)
            return new_keep, jnp.any(new_keep != keep)

        keep, _ = lax.while_loop(lambda kc: kc[1], sweep, (tile_candidate, jnp.array(True)))

        # Append the kept boxes in order; positions past the buffer drop, and
        # slots from max_output on are never read.
        position = jnp.where(keep, count + jnp.cumsum(keep) - 1, buffer_size)
        kept_boxes = kept_boxes.at[position].set(tile_boxes, mode="drop")
        kept_index = kept_index.at[position].set(tile_index, mode="drop")
        if class_ids is not None:
            kept_class = kept_class.at[position].set(tile_class, mode="drop")
        count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_output)
        return t + 1, count, kept_boxes, kept_class, kept_index

    def tile_cond(state):
        t, count = state[0], state[1]
        # Candidates are sorted first, so a tile that starts with a
        # non-candidate has none and neither has any later tile.
        first_is_candidate = sorted_candidate[jnp.minimum(t * tile, padded - 1)]
        return (t < num_tiles) & (count < max_output) & first_is_candidate

    init = (
        jnp.array(0, jnp.int32),
        jnp.array(0, jnp.int32),
        jnp.zeros((buffer_size, 4), boxes.dtype),
        jnp.zeros((buffer_size,), jnp.int32 if class_ids is None else class_ids.dtype),
        jnp.full((buffer_size,), -1, jnp.int32),
    )
    _, count, _, _, kept_index = lax.while_loop(tile_cond, tile_body, init)
    return kept_index[:max_output], slot < count


def nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: float,
    max_output: int,
    *,
    valid: jax.Array | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Greedy non-maximum suppression with a fixed-size output.

    Matches ``torchvision.ops.nms(boxes[m], scores[m], iou_threshold)[:K]``
    (indices mapped back to the unfiltered array), where ``m`` selects the
    valid entries, padded to ``K`` slots.

    Args:
      boxes: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      scores: ``(N,)`` scores; higher is kept first. Entries with score
        ``-inf`` (or NaN) are never selected, so ``-inf`` doubles as padding.
      iou_threshold: a box is dropped if its IoU with a kept, higher-ranked box
        is strictly greater than this. May be a traced scalar.
      max_output: ``K``, the static number of returned slots.
      valid: optional ``(N,)`` bool; False entries are never selected and
        never suppress others.
      tile_size: boxes per block of work (static); a tuning knob that does not
        change the result.

    Returns:
      ``(indices, valid)``: ``indices`` ``(K,)`` int32 into ``boxes``, in
      descending score order, padded with -1; ``valid`` ``(K,)`` bool, True
      for the first ``min(K, number kept)`` slots. Mask with ``valid`` before
      use: ``boxes[-1]`` is a real (wrapped) index in JAX.

    Raises:
      ValueError: if ``boxes`` is not ``(N, 4)``, ``scores`` or ``valid`` is not
        ``(N,)``, or ``max_output`` / ``tile_size`` is not a positive int.

    >>> boxes = jnp.array([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    >>> idx, ok = nms(boxes, jnp.array([0.9, 0.8, 0.7]), 0.5, max_output=4)
    >>> idx, ok
    (Array([ 0,  2, -1, -1], dtype=int32), Array([ True,  True, False, False], dtype=bool))
    """
    return _nms(boxes, scores, iou_threshold, max_output, valid, None, tile_size)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    class_ids: jax.Array,
    iou_threshold: float,
    max_output: int,
    valid: jax.Array | None = None,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Per-class greedy NMS with a fixed-size output.

    Boxes of different classes never suppress each other; the survivors of
    all classes are returned together in descending score order, the top
    ``K`` of them. Same result as ``torchvision.ops.batched_nms`` (truncated
    to ``K``). torchvision separates the classes by shifting each box by
    ``class_id * (max_coordinate + 1)``; here the IoU of boxes of different
    classes is masked out instead, which gives the same selection without the
    float32 rounding that large shifts bring to the IoU.

    Args:
      boxes: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      scores: ``(N,)`` scores; ``-inf`` (or NaN) entries are never selected.
      class_ids: ``(N,)`` integer class of each box.
      iou_threshold: suppression threshold (strictly greater suppresses).
      max_output: ``K``, the static number of returned slots.
      valid: optional ``(N,)`` bool; False entries are never selected.
      tile_size: boxes per block of work (static); does not change the result.

    Returns:
      ``(indices, valid)`` as in :func:`nms`: ``(K,)`` int32 padded with -1 and
      ``(K,)`` bool.

    Raises:
      ValueError: on the shape errors listed for :func:`nms`, or if
        ``class_ids`` is not ``(N,)``.

    >>> boxes = jnp.array([[0.0, 0, 10, 10], [1, 1, 10, 10], [1, 1, 10, 10]])
    >>> idx, ok = batched_nms(boxes, jnp.array([0.9, 0.8, 0.7]), jnp.array([0, 1, 0]), 0.5, 3)
    >>> idx, ok
    (Array([ 0,  1, -1], dtype=int32), Array([ True,  True, False], dtype=bool))
    """
    return _nms(boxes, scores, iou_threshold, max_output, valid, class_ids, tile_size)
