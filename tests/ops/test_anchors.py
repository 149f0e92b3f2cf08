"""Tests for jfcnn.ops.anchors against hand-written grids and torchvision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfcnn.ops.anchors import anchor_strides, generate_anchors, grid_anchors, multilevel_anchors

# Size 32, ratios (0.5, 1, 2): widths 32 / sqrt(r) = 45.25, 32, 22.63 and
# heights 32 * sqrt(r) = 22.63, 32, 45.25; halved and rounded.
CELL_32 = [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]


def test_generate_anchors_hand_computed():
    anchors = generate_anchors((32,), (0.5, 1.0, 2.0))
    assert anchors.dtype == np.float32
    np.testing.assert_array_equal(anchors, CELL_32)
    # Ratio-major order: for each ratio, every size.
    anchors = generate_anchors((16, 32), (1.0, 4.0))
    expected = [[-8, -8, 8, 8], [-16, -16, 16, 16], [-4, -16, 4, 16], [-8, -32, 8, 32]]
    np.testing.assert_array_equal(anchors, expected)


def test_generate_anchors_rounds_half_to_even():
    # Half-sizes 0.5, 1.5, 2.5, 3.5 round to 0, 2, 2, 4 (torch.round), not
    # away from zero (1, 2, 3, 4).
    anchors = generate_anchors((1, 3, 5, 7), (1.0,))
    np.testing.assert_array_equal(anchors[:, 2], [0, 2, 2, 4])
    np.testing.assert_array_equal(anchors[:, 0], [0, -2, -2, -4])


def test_grid_anchors_2x2_stride_16():
    anchors = grid_anchors(generate_anchors((32,), (0.5, 1.0, 2.0)), (2, 2), 16)
    # Locations row-major (y, then x), all three anchors of a location together.
    expected = []
    for shift_y in (0, 16):
        for shift_x in (0, 16):
            for x1, y1, x2, y2 in CELL_32:
                expected.append([x1 + shift_x, y1 + shift_y, x2 + shift_x, y2 + shift_y])
    assert anchors.shape == (12, 4)
    np.testing.assert_array_equal(anchors, expected)
    np.testing.assert_array_equal(
        anchors[:6],
        [
            [-23, -11, 23, 11],
            [-16, -16, 16, 16],
            [-11, -23, 11, 23],
            [-7, -11, 39, 11],
            [0, -16, 32, 16],
            [5, -23, 27, 23],
        ],
    )


def test_grid_anchors_rectangular_grid_and_stride():
    base = np.array([[-1.0, -2.0, 1.0, 2.0]], np.float32)
    anchors = grid_anchors(base, (2, 3), (10, 4))
    expected = [[x * 4 - 1, y * 10 - 2, x * 4 + 1, y * 10 + 2] for y in range(2) for x in range(3)]
    np.testing.assert_array_equal(anchors, expected)


def test_anchor_strides():
    assert anchor_strides((800, 1216), [(200, 304), (100, 152), (25, 38)]) == [
        (4, 4),
        (8, 8),
        (32, 32),
    ]
    assert anchor_strides((100, 90), [(13, 12)]) == [(7, 7)]


def test_multilevel_anchors_concatenates_levels():
    grid_sizes, strides = [(2, 2), (1, 2)], [16, (32, 32)]
    sizes, ratios = [(32,), (64, 128)], (0.5, 1.0, 2.0)
    anchors = multilevel_anchors(grid_sizes, strides, sizes, ratios)
    level0 = grid_anchors(generate_anchors((32,), ratios), (2, 2), 16)
    level1 = grid_anchors(generate_anchors((64, 128), ratios), (1, 2), 32)
    assert anchors.shape == (2 * 2 * 3 + 1 * 2 * 6, 4)
    np.testing.assert_array_equal(anchors, np.concatenate([level0, level1]))
    per_level_ratios = multilevel_anchors(grid_sizes, strides, sizes, [ratios, ratios])
    np.testing.assert_array_equal(per_level_ratios, anchors)


def test_anchors_are_jit_constants():
    @jax.jit
    def shifted(offset):
        return jnp.asarray(multilevel_anchors([(2, 2)], [16], [(32,)], (0.5, 1.0, 2.0))) + offset

    expected = grid_anchors(np.array(CELL_32, np.float32), 2, 16) + 1.0
    np.testing.assert_array_equal(shifted(1.0), expected)


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (generate_anchors, ((), (1.0,)), r"\(0,\)"),
        (generate_anchors, (((32, 64),), (1.0,)), r"\(1, 2\)"),
        (grid_anchors, (np.zeros((3, 2)), (2, 2), 16), r"\(3, 2\)"),
        (grid_anchors, (np.zeros((3, 4)), (2, 0), 16), r"grid_size"),
        (grid_anchors, (np.zeros((3, 4)), (2, 2), (16, 16, 16)), r"stride"),
        (multilevel_anchors, ([(2, 2)], [16, 32], [(32,)], (1.0,)), r"lengths 1, 2, 1, 1"),
    ],
)
def test_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_matches_torchvision_anchor_generator():
    torch = pytest.importorskip("torch")
    anchor_utils = pytest.importorskip("torchvision.models.detection.anchor_utils")
    image_list = pytest.importorskip("torchvision.models.detection.image_list")

    # torchvision's Mask R-CNN FPN defaults, on a non-square padded input.
    sizes = ((32,), (64,), (128,), (256,), (512,))
    ratios = ((0.5, 1.0, 2.0),) * len(sizes)
    image_size = (96, 160)
    grid_sizes = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    generator = anchor_utils.AnchorGenerator(sizes, ratios)
    images = image_list.ImageList(torch.zeros(1, 3, *image_size), [image_size])
    features = [torch.zeros(1, 1, h, w) for h, w in grid_sizes]
    expected = generator(images, features)[0].numpy()

    strides = anchor_strides(image_size, grid_sizes)
    assert strides[-1] == (48, 53)  # floor division, as torchvision
    np.testing.assert_array_equal(multilevel_anchors(grid_sizes, strides, sizes, ratios), expected)

    # Odd sizes and ratios exercise the float32 rounding path.
    odd_sizes, odd_ratios = (11, 23.5, 45), (0.3, 0.77, 1.9, 3.0)
    expected_cell = generator.generate_anchors(list(odd_sizes), list(odd_ratios)).numpy()
    np.testing.assert_array_equal(generate_anchors(odd_sizes, odd_ratios), expected_cell)
