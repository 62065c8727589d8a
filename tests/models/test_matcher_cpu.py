"""The one-pass Numba cost matrix of minidetr/models/matcher_cpu.py against the reference.

``HungarianMatcher.reference_cost`` (Tensor ops) is the definition; the kernel must give
the same (P, T) matrix: float64 within 1e-12, float32 within the rounding that NumPy's
float32 ``exp``/``log`` (SIMD, up to ~3 ulp) and the kernel's (libm, under 1 ulp) leave,
and the box terms bit for bit. Boxes that overlap, are disjoint, nested, identical or
just touching; every weight zeroed in turn; repeated labels; no targets; NaN and inf where
the reference has them (so that match_single's error still fires); the dispatch of
``cost_matrix(algorithm=...)``.
"""
from __future__ import annotations

import numpy as np
import pytest

from minidetr.models import matcher_cpu
from minidetr.models.box_ops import box_cxcywh_to_xyxy, box_iou
from minidetr.models.matcher import COST_ALGORITHMS, HungarianMatcher, match_single
from minidetr.testing import assert_allclose

WEIGHTS = [(2.0, 5.0, 2.0), (0.0, 5.0, 2.0), (2.0, 0.0, 2.0), (2.0, 5.0, 0.0)]


def box_zoo(rng, tgt_boxes, n_random):
    """Predictions that stand in every relation to the targets (T, 4) cxcywh: identical,
    nested inside, containing, half overlapping, touching an edge, far apart, plus
    ``n_random`` random boxes. -> (6 T + n_random, 4)."""
    cx, cy, w, h = tgt_boxes.T                                        # each (T,)
    zoo = [tgt_boxes,                                                 # identical
           np.stack([cx, cy, 0.5 * w, 0.5 * h], 1),                   # nested inside
           np.stack([cx, cy, 1.5 * w, 1.2 * h], 1),                   # containing
           np.stack([cx + 0.5 * w, cy, w, h], 1),                     # half overlapping
           np.stack([cx + w, cy, w, h], 1),                           # touching (I = 0)
           np.stack([cx + 3.0, cy - 2.0, w, h], 1),                   # far apart
           np.concatenate([rng.uniform(0.2, 0.8, (n_random, 2)),
                           rng.uniform(0.01, 0.5, (n_random, 2))], 1)]
    return np.concatenate(zoo)                                        # (6 T + n_random, 4)


def make_case(rng, B, n_targets, num_classes, dtype, logit_scale=3.0):
    """A batch whose predictions relate to the targets in every way (see box_zoo), with
    repeated labels and a few infinite logits."""
    T = sum(n_targets)
    tgt = np.concatenate([rng.uniform(0.3, 0.7, (T, 2)), rng.uniform(0.05, 0.3, (T, 2))], 1)
    preds = box_zoo(rng, tgt, n_random=4 * B)                         # (P_zoo, 4)
    Q = -(-preds.shape[0] // B)                                       # ceil
    preds = np.concatenate([preds, preds[:B * Q - preds.shape[0]]])   # (B*Q, 4)
    logits = rng.normal(scale=logit_scale, size=(B * Q, num_classes))  # (B*Q, num_classes)
    logits[0, :2] = [np.inf, -np.inf]
    labels = rng.integers(0, 3, size=T)                               # few classes: repeats
    outputs = {"pred_logits": logits.reshape(B, Q, num_classes).astype(dtype),
               "pred_boxes": rng.permutation(preds).reshape(B, Q, 4).astype(dtype)}
    starts = np.cumsum([0] + list(n_targets))
    targets = [{"labels": labels[s:e].astype(np.int64), "boxes": tgt[s:e].astype(dtype)}
               for s, e in zip(starts[:-1], starts[1:])]
    return outputs, targets


def assert_same_nonfinite(got, want, what):
    """NaN and +-inf at the same (b, q, t) elements, naming the first that differs."""
    for name, test in [("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)]:
        differ = test(got) != test(want)
        if differ.any():
            k = tuple(int(v) for v in np.argwhere(differ)[0])
            raise AssertionError(f"{what}: element {k} is {got[k]}, the reference gives "
                                 f"{want[k]} ({name} differs)")


def float32_tolerance(outputs, targets, want, w_class):
    """Per element: 1e-6 relative, plus what the class cost's conditioning makes of a few
    float32 ulps of difference in exp/log: log(1 - s + 1e-8) turns a relative error d in
    s = sigmoid(x) into d / (1 - s + 1e-8). Shapes: -> (B, Q, T)."""
    B, Q, num_classes = outputs["pred_logits"].shape
    labels = np.concatenate([t["labels"] for t in targets])
    x = outputs["pred_logits"].astype(np.float64).reshape(B * Q, num_classes)[:, labels]
    s = 1.0 / (1.0 + np.exp(-x))                                      # (B*Q, T)
    cond = (20.0 + 1.0 / (1.0 - s + 1e-8)).reshape(B, Q, -1)          # (B, Q, T)
    eps = float(np.finfo(np.float32).eps)
    return 1e-6 * np.abs(want) + 4 * eps * w_class * cond


def check_kernel_equals_reference(matcher, outputs, targets, dtype, what):
    want = matcher.cost_matrix(outputs, targets, algorithm="reference")
    got = matcher.cost_matrix(outputs, targets, algorithm="numba")
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, \
        f"{what}: {got.shape} {got.dtype} vs the reference's {want.shape} {want.dtype}"
    assert_same_nonfinite(got, want, what)
    finite = np.isfinite(want)
    got, want = np.where(finite, got, 0), np.where(finite, want, 0)
    if dtype == np.float64:
        assert_allclose(got, want, rtol=1e-12, atol=1e-12, what=what)
    elif matcher.cost_class == 0:                                     # box terms: bit for bit
        assert_allclose(got, want, rtol=0, atol=0, what=what)
    else:
        tol = float32_tolerance(outputs, targets, want, matcher.cost_class)
        bad = np.abs(got - want) > tol
        if bad.any():
            k = tuple(int(v) for v in np.argwhere(bad)[0])
            raise AssertionError(f"{what}: element {k} is {got[k]!r}, the reference gives "
                                 f"{want[k]!r} (|diff| {abs(got[k] - want[k]):.3g} > "
                                 f"{tol[k]:.3g}; {int(bad.sum())} elements differ)")
    return got, want


# --------------------------------------------------------------------------- equal to the reference
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["all", "no_class", "no_bbox", "no_giou"])
@pytest.mark.parametrize("n_targets", [[5], [3, 1, 4]], ids=["B1", "B3"])
def test_kernel_equals_reference(rng, dtype, weights, n_targets):
    outputs, targets = make_case(rng, len(n_targets), n_targets, num_classes=7, dtype=dtype)
    check_kernel_equals_reference(HungarianMatcher(*weights), outputs, targets, dtype,
                                  f"{np.dtype(dtype).name} weights {weights}")

    # the case holds what it claims: identical, nested, touching and disjoint pairs
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].reshape(-1, 4).astype(np.float64))
    tgt = box_cxcywh_to_xyxy(np.concatenate([t["boxes"] for t in targets]).astype(np.float64))
    iou, _ = box_iou(boxes, tgt)
    assert (np.abs(iou - 1) < 1e-6).any() and (iou == 0).any() and \
        (np.abs(iou - 0.25) < 1e-6).any(), "the zoo lost its identical/disjoint/nested pairs"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_other_focal_parameters_and_large_logits(rng, dtype):
    """gamma != 2 takes the power function; logits up to +-20 saturate the sigmoid."""
    outputs, targets = make_case(rng, 2, [4, 3], num_classes=5, dtype=dtype, logit_scale=8.0)
    matcher = HungarianMatcher(cost_class=1.5, focal_alpha=0.4, focal_gamma=1.5)
    check_kernel_equals_reference(matcher, outputs, targets, dtype, "alpha 0.4, gamma 1.5")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assignments_equal(rng, dtype):
    outputs, targets = make_case(rng, 2, [6, 9], num_classes=91, dtype=dtype)
    matcher = HungarianMatcher()
    got, want = check_kernel_equals_reference(matcher, outputs, targets, dtype, "assignment")
    starts = np.cumsum([0, 6, 9])
    for i in range(2):
        columns = slice(starts[i], starts[i + 1])                     # image i's targets
        for a, b, name in zip(match_single(got[i, :, columns]),
                              match_single(want[i, :, columns]), ["pred_idx", "tgt_idx"]):
            np.testing.assert_array_equal(a, b, err_msg=f"image {i}: {name}")


def test_no_targets(rng):
    outputs, targets = make_case(rng, 2, [0, 3], num_classes=4, dtype=np.float32)
    check_kernel_equals_reference(HungarianMatcher(), outputs, targets, np.float32, "[0, 3]")
    empty = [{"labels": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32)}] * 2
    cost = HungarianMatcher().cost_matrix(outputs, empty, algorithm="numba")
    assert cost.shape == outputs["pred_boxes"].shape[:2] + (0,) and cost.dtype == np.float32
    direct = matcher_cpu.cost_matrix(outputs["pred_logits"][0], np.zeros(0, np.int64),
                                     outputs["pred_boxes"][0], np.zeros((0, 4), np.float32),
                                     2, 5, 2, 0.25, 2)
    assert direct.shape == (outputs["pred_boxes"].shape[1], 0)


def test_one_compiled_signature_per_dtype(rng):
    """Views, int32 labels and int weights all reach the same compiled kernel."""
    for dtype in (np.float32, np.float64):
        logits = rng.normal(size=(6, 8)).astype(dtype)[:, ::2]        # not contiguous
        boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.2], dtype), (6, 1))
        matcher_cpu.cost_matrix(logits, np.array([1, 3], np.int32), boxes, boxes[:2],
                                2, 5, 2, 0.25, 2)
    dtypes = [sig[0].dtype for sig in matcher_cpu._cost_matrix.signatures]
    assert len(dtypes) == len(set(dtypes)) <= 2, f"compiled for {dtypes}"


# --------------------------------------------------------------------------- NaN and inf
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_degenerate_boxes_give_nan_as_the_reference(dtype):
    """Zero-size boxes: I/U = 0/0 (NaN) and, with a zero enclosing box, (|C| - U)/|C| too.
    A NaN logit spoils its row only where the class cost is used; a NaN or infinite box
    coordinate where the box terms are."""
    tgt = np.array([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]], dtype)
    preds = np.array([[0.5, 0.5, 0.0, 0.0],           # the same point: |C| = 0
                      [0.3, 0.5, 0.0, 0.0],           # another point on the line: U = 0
                      [0.5, 0.5, 0.2, 0.2],           # a proper box around the point
                      [0.8, 0.8, -0.1, 0.1],          # negative width
                      [np.nan, 0.5, 0.1, 0.1],        # non-finite predictions
                      [0.5, 0.5, np.inf, 0.1]], dtype)
    outputs = {"pred_logits": np.zeros((1, 6, 3), dtype), "pred_boxes": preds[None]}
    outputs["pred_logits"][0, 2, 1] = np.nan
    targets = [{"labels": np.array([0, 1]), "boxes": tgt}]
    for weights in WEIGHTS + [(2.0, 0.0, 0.0), (0.0, 5.0, 0.0), (0.0, 0.0, 2.0)]:
        check_kernel_equals_reference(HungarianMatcher(*weights), outputs, targets, dtype,
                                      f"degenerate, weights {weights}")
    cost = HungarianMatcher().cost_matrix(outputs, targets, algorithm="numba")
    assert np.isnan(cost[0, 0, 0]) and np.isnan(cost[0, 1, 0]) and np.isnan(cost[0, 2, 1]), \
        f"expected NaN at (0, 0, 0), (0, 1, 0) and (0, 2, 1):\n{cost[0]}"
    with pytest.raises(ValueError, match="NaN or infinite"):
        HungarianMatcher()(outputs, targets)


# --------------------------------------------------------------------------- dispatch and errors
@pytest.fixture
def spies(monkeypatch):
    """Which path cost_matrix took: the kernel's or the reference's calls, recorded."""
    calls = []
    kernel, reference = matcher_cpu.cost_matrix, HungarianMatcher.reference_cost

    def spy_kernel(*args):
        calls.append("numba")
        return kernel(*args)

    def spy_reference(self, *args):
        calls.append("reference")
        return reference(self, *args)

    monkeypatch.setattr(matcher_cpu, "cost_matrix", spy_kernel)
    monkeypatch.setattr(HungarianMatcher, "reference_cost", spy_reference)
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_auto_takes_the_kernel_for_numpy_floats(rng, spies, dtype):
    outputs, targets = make_case(rng, 1, [2], num_classes=3, dtype=dtype)
    HungarianMatcher().cost_matrix(outputs, targets)
    HungarianMatcher().cost_matrix(outputs, targets, algorithm="reference")
    assert spies == ["numba", "reference"]


def test_auto_takes_the_reference_elsewhere(rng, spies):
    from minidetr.testing import fakecupy
    outputs, targets = make_case(rng, 1, [2], num_classes=3, dtype=np.float32)
    mixed = dict(outputs, pred_boxes=outputs["pred_boxes"].astype(np.float64))
    with pytest.raises(TypeError, match="different float dtypes"):   # the reference's error
        HungarianMatcher().cost_matrix(mixed, targets)
    with fakecupy.installed() as cp:
        device = {k: cp.asarray(v) for k, v in outputs.items()}
        cost = HungarianMatcher().cost_matrix(device, targets)
        with pytest.raises(ValueError, match="algorithm='numba' needs NumPy"):
            HungarianMatcher().cost_matrix(device, targets, algorithm="numba")
    assert spies == ["reference", "reference"]
    assert isinstance(cost, np.ndarray) and cost.shape == (1, outputs["pred_boxes"].shape[1], 2)


def test_clear_errors(rng):
    outputs, targets = make_case(rng, 1, [2], num_classes=3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"algorithm must be one of \('auto', 'reference', "
                                         r"'numba'\), got 'fast'"):
        HungarianMatcher().cost_matrix(outputs, targets, algorithm="fast")
    assert COST_ALGORITHMS == ("auto", "reference", "numba")
    mixed = dict(outputs, pred_boxes=outputs["pred_boxes"].astype(np.float64))
    with pytest.raises(ValueError, match="needs NumPy pred_logits and pred_boxes of one dtype"):
        HungarianMatcher().cost_matrix(mixed, targets, algorithm="numba")
    for bad in (3, -1):
        wrong = [dict(targets[0], labels=np.array([0, bad]))]
        for algorithm in COST_ALGORITHMS:
            with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must lie in \[0, 3\)"):
                HungarianMatcher().cost_matrix(outputs, wrong, algorithm=algorithm)
