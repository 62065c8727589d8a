"""The notebooks' drawing helpers draw what they say: ``minidetr/lessons/viz.py`` and
``viz_model.py``.

Every test draws on a Matplotlib ``Figure`` with the Agg canvas (no pyplot, no global
backend) and inspects the artists: how many markers, rectangles, lines and texts, and
*where* they are, against coordinates computed independently here (a normalised ``x``
lands at ``x * W - 0.5``), the bilinear weights of the op and the box ops of the model.
"""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from minidetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from minidetr.lessons import viz
from minidetr.lessons import viz_model as vm
from minidetr.models import box_cxcywh_to_xyxy, generalized_box_iou
from minidetr.ops.msda.reference import bilinear_corners
from minidetr.testing import assert_allclose


def new_axes(ncols=1):
    """Fresh axes on an Agg canvas (one, or a list of ``ncols``)."""
    fig = Figure(figsize=(3 * ncols, 3))
    FigureCanvasAgg(fig)
    return fig.subplots(1, ncols)


@pytest.fixture
def ax():
    return new_axes()


def scatter_offsets(ax):
    """The (x, y) of every scatter collection on ``ax``, one array per collection."""
    return [np.asarray(c.get_offsets(), dtype=np.float64) for c in ax.collections]


def rectangles(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def corners_of(rect):
    """(x0, y0, x1, y1) of a Rectangle patch, in data coordinates."""
    x, y = rect.get_xy()
    return np.array([x, y, x + rect.get_width(), y + rect.get_height()], dtype=np.float64)


# --------------------------------------------------------------------------- viz: basics
def test_to_pixels_puts_pixel_centres_at_integers():
    H, W = 4, 5
    j, i = np.meshgrid(np.arange(W), np.arange(H))
    centres = np.stack([(j + 0.5) / W, (i + 0.5) / H], axis=-1)           # (H, W, 2)
    uv = viz.to_pixels(centres, H, W)
    np.testing.assert_allclose(uv[..., 0], j, atol=1e-12)
    np.testing.assert_allclose(uv[..., 1], i, atol=1e-12)
    edges = viz.to_pixels(np.array([[0.0, 0.0], [1.0, 1.0]]), H, W)       # the map's edges
    np.testing.assert_allclose(edges, [[-0.5, -0.5], [W - 0.5, H - 0.5]])


def test_head_colors_are_distinct_then_repeat():
    colours = viz.head_colors(12)
    assert len(colours) == 12 and len(set(colours[:10])) == 10
    assert colours[10] == colours[0] and colours[11] == colours[1]


def test_feature_to_image_colour_norm_and_errors():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(-3, 5, size=(4, 6, 3))
    out = viz.feature_to_image(rgb)
    assert out.shape == (4, 6, 3) and out.min() == 0 and out.max() == 1
    np.testing.assert_allclose(out, (rgb - rgb.min()) / (rgb.max() - rgb.min()))
    features = rng.normal(size=(4, 6, 8))
    np.testing.assert_allclose(viz.feature_to_image(features),
                               np.sqrt((features ** 2).sum(-1)))
    assert not viz.feature_to_image(np.full((2, 2, 3), 7.0)).any()       # flat picture: 0
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        viz.feature_to_image(np.zeros((2, 3, 4, 5)))


def test_show_map_shows_the_summarised_map_without_ticks(ax):
    feature = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    viz.show_map(ax, feature, title="C = 4")
    shown, = ax.images
    np.testing.assert_allclose(shown.get_array(), np.linalg.norm(feature, axis=-1))
    assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
    assert ax.get_title() == "C = 4"


# --------------------------------------------------------------------------- viz: points
def test_draw_sampling_points_one_marker_per_point_where_the_op_samples(ax):
    M, K, H, W = 3, 4, 6, 8
    rng = np.random.default_rng(1)
    locations = rng.uniform(0, 1, size=(M, K, 2))
    locations[0, 0] = (1.2, -0.1)                                # outside the map
    weights = rng.dirichlet(np.ones(K), size=M)                  # (M, K)
    reference = np.array([0.25, 0.75])
    viz.show_map(ax, np.zeros((H, W)))
    viz.draw_sampling_points(ax, locations, H, W, weights, reference, area_per_weight=500.0)
    heads, ref = ax.collections[:M], ax.collections[M]
    assert len(ax.collections) == M + 1
    for m, points in enumerate(heads):
        expected = np.stack([locations[m, :, 0] * W - 0.5, locations[m, :, 1] * H - 0.5], -1)
        assert_allclose(points.get_offsets(), expected, 1e-12, 1e-12, what=f"head {m}")
        assert_allclose(points.get_sizes(), 500.0 * weights[m], 1e-12, 0, what="areas")
        assert to_rgba(points.get_facecolor()[0]) == to_rgba(viz.head_colors(M)[m])
    np.testing.assert_allclose(ref.get_offsets(), [[0.25 * W - 0.5, 0.75 * H - 0.5]])
    assert len(ax.lines) == M * K                                # each point joined to ref
    for line in ax.lines:
        assert np.allclose(line.get_xydata()[0], ref.get_offsets()[0])
    # the point outside the map stays in view
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    outside = heads[0].get_offsets()[0]
    assert x0 <= outside[0] <= x1 and y0 <= outside[1] <= y1 and x1 > W - 0.5


def test_draw_sampling_points_rejects_mismatched_shapes(ax):
    with pytest.raises(ValueError, match=r"\(M, K, 2\)"):
        viz.draw_sampling_points(ax, np.zeros((2, 3)), 4, 4)
    with pytest.raises(ValueError, match=r"weights must be \(M, K\) = \(2, 3\)"):
        viz.draw_sampling_points(ax, np.zeros((2, 3, 2)), 4, 4, weights=np.ones((3, 2)))


def test_draw_levels_scales_each_level_and_reports_its_attention_mass():
    levels = [np.zeros((8, 10)), np.zeros((4, 5))]
    M, L, K = 2, 2, 3
    rng = np.random.default_rng(2)
    locations = rng.uniform(0.1, 0.9, size=(M, L, K, 2))
    weights = rng.dirichlet(np.ones(L * K), size=M).reshape(M, L, K)   # softmax over L*K
    axes = new_axes(2)
    viz.draw_levels(axes, levels, locations, weights, reference=(0.5, 0.5))
    for l, (ax, level) in enumerate(zip(axes, levels)):
        H, W = level.shape
        mass = weights[:, l].sum() / M
        assert ax.get_title() == f"level {l}: {H} x {W}\nattention mass {mass:.2f}"
        expected = locations[0, l] * (W, H) - 0.5
        np.testing.assert_allclose(ax.collections[0].get_offsets(), expected)
    with pytest.raises(ValueError, match="L = 2 levels"):
        viz.draw_levels(axes, levels, locations[:, :1])


def test_bilinear_neighbourhood_rectangles_have_the_op_weights_as_areas(ax):
    H, W, x, y = 4, 5, 0.37, 0.58
    viz.draw_bilinear_neighbourhood(ax, np.arange(H * W, dtype=float).reshape(H, W), x, y)
    weights = [p for p in rectangles(ax) if p.get_fill()]        # the four shaded areas
    assert len(weights) == 4
    areas = np.array([p.get_width() * p.get_height() for p in weights])
    expected = np.array([float(c.weight[0]) for c in
                         bilinear_corners(np.array([x]), np.array([y]), H, W)])
    assert_allclose(areas, expected, 1e-12, 1e-12, what="rectangle area = bilinear weight")
    assert abs(areas.sum() - 1) < 1e-12
    u, v = x * W - 0.5, y * H - 0.5
    for rect in weights:                          # each rectangle touches the point
        x0, y0, x1, y1 = corners_of(rect)
        assert np.isclose(u, [x0, x1]).any() and np.isclose(v, [y0, y1]).any()
    point = ax.collections[-1].get_offsets()[0]   # the sampling point, drawn last
    np.testing.assert_allclose(point, (u, v))
    frame = [p for p in rectangles(ax) if not p.get_fill()]      # the map's border
    assert len(frame) == 1 and np.allclose(corners_of(frame[0]), (-0.5, -0.5, W - 0.5, H - 0.5))


def test_bilinear_neighbourhood_marks_neighbours_in_the_padding_hollow(ax):
    """At the top-left corner three of the four neighbours read the zero padding."""
    viz.draw_bilinear_neighbourhood(ax, np.ones((3, 3)), 0.05, 0.05, zoom=True)
    neighbours = ax.collections[:4]
    hollow = [to_rgba(c.get_facecolor()[0]) == to_rgba("white") for c in neighbours]
    assert hollow == [True, True, True, False]                   # only (0, 0) is inside
    assert sum("padding" in t.get_text() for t in ax.texts) == 3


# --------------------------------------------------------------------------- viz: scaling
def test_fit_scale_recovers_the_constant_and_rejects_bad_input(ax):
    x = np.array([1.0, 2.0, 4.0, 8.0])
    model = x ** 2
    assert np.isclose(viz.fit_scale(3.5 * model, model), 3.5)
    assert np.isclose(viz.fit_scale(model * [2, 8, 2, 8], model), 4.0)     # geometric mean
    with pytest.raises(ValueError, match="positive"):
        viz.fit_scale([1.0, -1.0], [1.0, 1.0])
    c = viz.plot_against_model(ax, x, 3.5 * model, model, "op")
    measured, fitted = ax.lines
    assert np.isclose(c, 3.5) and ax.get_xscale() == "log" and ax.get_yscale() == "log"
    np.testing.assert_allclose(fitted.get_ydata(), 3.5 * model)
    np.testing.assert_allclose(measured.get_ydata(), 3.5 * model)


# --------------------------------------------------------------------------- viz_model
def test_image_for_display_undoes_the_normalisation():
    rng = np.random.default_rng(3)
    pixels = rng.uniform(0, 1, size=(5, 7, 3))
    normalised = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)   # (3, H, W)
    np.testing.assert_allclose(vm.image_for_display(normalised), pixels, atol=1e-12)
    assert vm.image_for_display(np.full((3, 2, 2), 50.0)).max() == 1.0          # clipped
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        vm.image_for_display(np.zeros((5, 7, 3)))


def test_show_image_shades_only_the_padding(ax):
    image = np.zeros((3, 4, 6), np.float32)                      # a model input, (3, H, W)
    mask = np.zeros((4, 6), bool)
    mask[:, 4:] = True                                           # two padded columns
    vm.show_image(ax, image, mask, title="padded")
    picture, shade = ax.images
    assert picture.get_array().shape == (4, 6, 3)                # shown as (H, W, 3)
    shaded = ~np.ma.getmaskarray(shade.get_array())
    np.testing.assert_array_equal(shaded, mask)
    assert ax.get_title() == "padded" and not ax.axison


def test_draw_boxes_places_normalised_boxes_in_pixels(ax):
    H, W = 40, 60
    vm.show_image(ax, np.zeros((H, W, 3)))
    limits = ax.get_xlim(), ax.get_ylim()
    boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2], [1.1, 0.5, 0.4, 0.4]])
    vm.draw_boxes(ax, boxes, (H, W), colour=["red", "green", "blue"], labels=["a", "b", "c"])
    drawn = rectangles(ax)
    assert len(drawn) == 3 and [t.get_text() for t in ax.texts] == ["a", "b", "c"]
    xyxy = box_cxcywh_to_xyxy(boxes)                              # normalised corners
    for rect, corners, colour in zip(drawn, xyxy, ["red", "green", "blue"]):
        expected = corners * (W, H, W, H) - 0.5
        assert_allclose(corners_of(rect), expected, 1e-9, 1e-9, what="box corners")
        assert to_rgba(rect.get_edgecolor()) == to_rgba(colour)
    assert (ax.get_xlim(), ax.get_ylim()) == limits               # the picture stays in view


def test_draw_points_scatters_at_pixel_positions(ax):
    points = np.array([[[0.0, 0.0], [0.5, 0.25]], [[1.0, 1.0], [0.1, 0.9]]])   # (2, 2, 2)
    vm.draw_points(ax, points, (10, 20), colour="black")
    offsets, = scatter_offsets(ax)
    np.testing.assert_allclose(offsets, points.reshape(-1, 2) * (20, 10) - 0.5)


def test_sampling_points_on_image_one_colour_per_level_area_by_weight(ax):
    M, L, K = 2, 3, 2
    rng = np.random.default_rng(4)
    locations = rng.uniform(0, 1, size=(M, L, K, 2))
    weights = rng.dirichlet(np.ones(L * K), size=M).reshape(M, L, K)
    extents = [(64, 96), (64, 96), (70, 100)]     # padded map x stride, per level
    vm.draw_sampling_points_on_image(ax, locations, weights, extents,
                                     reference=np.array([0.5, 0.5, 0.2, 0.3]),
                                     reference_extent_hw=(60, 90), max_area=80.0)
    *levels, reference = ax.collections
    assert len(levels) == L
    scale = 80.0 / weights.max()
    for collection in levels:                     # drawn coarsest first, finest on top
        l = int(collection.get_label().split()[-1])
        (H, W) = extents[l]
        expected = locations[:, l].reshape(-1, 2) * (W, H) - 0.5
        np.testing.assert_allclose(collection.get_offsets(), expected)
        np.testing.assert_allclose(collection.get_sizes(), weights[:, l].ravel() * scale + 3)
        assert to_rgba(collection.get_facecolor()[0], 1) == to_rgba(vm.LEVEL_COLOURS[l])
    assert [c.get_label() for c in levels] == ["level 2", "level 1", "level 0"]
    assert max(c.get_sizes().max() for c in levels) == pytest.approx(83.0)
    np.testing.assert_allclose(reference.get_offsets(), [[0.5 * 90 - 0.5, 0.5 * 60 - 0.5]])
    box, = rectangles(ax)                          # the reference box, dashed
    np.testing.assert_allclose(corners_of(box), np.array([0.4, 0.35, 0.6, 0.65]) *
                               (90, 60, 90, 60) - 0.5)
    with pytest.raises(ValueError, match="disagree"):
        vm.draw_sampling_points_on_image(ax, locations, weights[:, :2], extents)


def test_box_trajectory_draws_every_step_and_the_target(ax):
    steps = np.array([[0.3, 0.3, 0.2, 0.2], [0.4, 0.35, 0.25, 0.2], [0.5, 0.4, 0.3, 0.2]])
    target = np.array([0.5, 0.4, 0.3, 0.25])
    vm.draw_box_trajectory(ax, steps, (50, 100), target=target, labels=["a", "b", "c"])
    target_box, *boxes = rectangles(ax)
    assert len(boxes) == 3 and target_box.get_linestyle() == "--"
    for rect, box in zip(boxes, steps):
        np.testing.assert_allclose(corners_of(rect), box_cxcywh_to_xyxy(box[None])[0] *
                                   (100, 50, 100, 50) - 0.5)
    path, = ax.lines                                              # the centres, joined
    np.testing.assert_allclose(path.get_xydata(), steps[:, :2] * (100, 50) - 0.5)
    assert [c.get_label() for c in ax.collections] == ["a", "b", "c"]
    colours = [to_rgba(r.get_edgecolor()) for r in boxes]
    assert len(set(colours)) == 3                                 # dark to bright


def test_cost_matrix_writes_every_cost_and_outlines_the_assignment(ax):
    cost = np.array([[0.1, 2.0], [1.5, 0.3], [0.9, 0.8]])
    vm.draw_cost_matrix(ax, cost, assignment=(np.array([0, 1]), np.array([0, 1])))
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{c:.2f}" for c in cost.ravel())
    for text in ax.texts:                          # each number sits in its own cell
        t, q = (int(round(v)) for v in text.get_position())
        assert text.get_text() == f"{cost[q, t]:.2f}"
    outlines = rectangles(ax)
    assert [tuple(corners_of(r)) for r in outlines] == [(-0.5, -0.5, 0.5, 0.5),
                                                        (0.5, 0.5, 1.5, 1.5)]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["query 0", "query 1", "query 2"]


@pytest.mark.parametrize("box_b", [(2.0, 1.0, 6.0, 5.0), (5.0, 5.0, 7.0, 8.0)],
                         ids=["overlapping", "disjoint"])
def test_draw_giou_matches_the_box_ops(ax, box_b):
    box_a = np.array([0.0, 0.0, 4.0, 3.0])
    box_b = np.array(box_b)
    _, iou, giou = vm.draw_giou(ax, box_a, box_b)
    expected = float(generalized_box_iou(box_a[None], box_b[None])[0, 0])
    assert giou == pytest.approx(expected, abs=1e-12)
    drawn = {p.get_label(): corners_of(p) for p in rectangles(ax)}
    np.testing.assert_allclose(drawn["enclosing box C"],
                               [0, 0, max(4, box_b[2]), max(3, box_b[3])])
    np.testing.assert_allclose(drawn["A"], box_a)
    np.testing.assert_allclose(drawn["B"], box_b)
    if box_b[0] < 4:                                       # they overlap: I is drawn
        np.testing.assert_allclose(drawn["intersection I"], [2, 1, 4, 3])
        assert iou == pytest.approx(4 / (12 + 16 - 4))
    else:
        assert "intersection I" not in drawn and iou == 0 and giou < 0
