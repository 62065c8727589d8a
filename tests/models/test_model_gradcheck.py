"""Float64 gradient check of the WHOLE tiny detector, for every kind of parameter.

The unit tests check each Function and layer on its own; this one checks that they are
wired together right: the gradient that ``backward()`` gives each parameter of the full
model (backbone, input projections, level embedding, encoder, decoder, queries, heads,
two-stage parts) equals the central difference of

* ``"criterion"``: the SetCriterion's weighted total loss (final, auxiliary and encoder
  sets), with the Hungarian matching computed once and then replayed (the matching is
  piecewise constant in the parameters: it has no derivative, only jumps);
* ``"outputs"``: sum(G * logits) + sum(H * boxes) over every prediction set, with fixed
  random G, H (every output element counts, not only the matched ones);

both from the same finite-difference evaluations (:func:`minidetr.testing.gradcheck_module`),
tolerance 1e-6 on |a - n| / max(1, |a|, |n|), 2 random elements of every parameter listed.

Two things make the model a piecewise-smooth function and need care; the tolerance is
never loosened for them.

**Kinks.** ReLU at 0, bilinear sampling where a point crosses a pixel centre, |x| in the
L1 loss, min/max/clamp in GIoU and inverse_sigmoid. The official initialisation sits
*exactly* on bilinear kinks: encoder reference points are pixel centres and the ring of
initial offsets is in whole pixels, so every sampling point lands on a pixel centre. So
the model is first moved to a generic point: every parameter whose entries are all equal
(zero-initialised weights, constant biases, norm weights of 1) and the sampling-offset
biases get seeded N(0, 0.1) noise. Then :class:`Instruments` records every discrete
decision of a forward pass (ReLU signs, the bilinear cell of every sampling point, the
sign of every |x|, min/max and clamp argument); an element whose +-eps evaluations change
any decision lies within eps of a kink and is replaced by another one.

**Stop-gradients.** With refinement, the reference of layer i + 1 is detached, and the
two-stage queries are built from detached top-k proposals. The analytic gradient is the
derivative of the model with those values held constant, while a plain finite difference
would also move them. :class:`Instruments` therefore records each detached value in a
first forward pass and replays it in every finite-difference pass: the numeric derivative
is taken with the detached values constant, as the paper defines the gradient. The
analytic pass uses the live values, so a reference that the model forgot to detach would
make the check fail (the analytic gradient would have extra terms).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from minidetr import functional as F
from minidetr import nn
from minidetr.autograd import Function, Tensor, as_array, is_grad_enabled
from minidetr.models import deformable_transformer as dt
from minidetr.models.build import build_criterion, build_model
from minidetr.models.config import get_config
from minidetr.nn.msdeform_attn import MSDeformAttn
from minidetr.testing import GradcheckError, gradcheck_module

VARIANTS = ("plain", "refine", "two-stage")

# Parameters checked: at least one of every kind, in every part of the model.
COMMON = [
    # backbone (TinyBackbone: conv -> GroupNorm -> ReLU)
    "backbone.0.body.stem.conv.weight", "backbone.0.body.layer2.norm.weight",
    "backbone.0.body.layer4.conv.weight", "backbone.0.body.layer4.norm.bias",
    # input projections (1x1 conv + GroupNorm) and the level embedding
    "input_proj.0.0.weight", "input_proj.2.0.bias", "input_proj.1.1.weight",
    "input_proj.0.1.bias", "transformer.level_embed",
    # encoder: deformable self-attention, FFN, LayerNorms
    "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
    "transformer.encoder.layers.0.self_attn.sampling_offsets.bias",
    "transformer.encoder.layers.1.self_attn.attention_weights.weight",
    "transformer.encoder.layers.0.self_attn.attention_weights.bias",
    "transformer.encoder.layers.0.self_attn.value_proj.weight",
    "transformer.encoder.layers.1.self_attn.output_proj.weight",
    "transformer.encoder.layers.0.linear1.weight", "transformer.encoder.layers.1.linear2.bias",
    "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.1.norm2.bias",
    # decoder: self-attention, deformable cross-attention, FFN, LayerNorms
    "transformer.decoder.layers.0.self_attn.in_proj_weight",
    "transformer.decoder.layers.1.self_attn.out_proj.bias",
    "transformer.decoder.layers.0.self_attn.out_proj.weight",
    "transformer.decoder.layers.1.cross_attn.sampling_offsets.weight",
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.bias",
    "transformer.decoder.layers.0.cross_attn.attention_weights.weight",
    "transformer.decoder.layers.1.cross_attn.value_proj.weight",
    "transformer.decoder.layers.0.cross_attn.output_proj.bias",
    "transformer.decoder.layers.0.linear1.weight", "transformer.decoder.layers.1.linear2.weight",
    "transformer.decoder.layers.0.norm1.weight", "transformer.decoder.layers.1.norm2.bias",
    "transformer.decoder.layers.0.norm3.weight",
    # prediction heads of both decoder layers (shared in plain, independent otherwise)
    "class_embed.0.weight", "class_embed.1.bias", "bbox_embed.0.layers.0.weight",
    "bbox_embed.0.layers.2.bias", "bbox_embed.1.layers.2.weight",
]
SINGLE_STAGE = ["query_embed.weight", "transformer.reference_points.weight",
                "transformer.reference_points.bias"]
TWO_STAGE = [
    "class_embed.2.weight", "class_embed.2.bias",                  # the proposal heads
    "bbox_embed.2.layers.1.weight", "bbox_embed.2.layers.2.bias",
    "transformer.enc_output.weight", "transformer.enc_output.bias",
    "transformer.enc_output_norm.weight", "transformer.enc_output_norm.bias",
    "transformer.pos_trans.weight", "transformer.pos_trans.bias",
    "transformer.pos_trans_norm.weight", "transformer.pos_trans_norm.bias",
]
PARAMS = {"plain": COMMON + SINGLE_STAGE, "refine": COMMON + SINGLE_STAGE,
          "two-stage": COMMON + TWO_STAGE}

TARGETS = [{"labels": np.array([1, 3]),
            "boxes": np.array([[0.3, 0.4, 0.3, 0.2], [0.7, 0.62, 0.24, 0.4]])},
           {"labels": np.array([2]), "boxes": np.array([[0.45, 0.5, 0.3, 0.35]])}]


# --------------------------------------------------------------------------- instruments
class Instruments:
    """Hooks into the forward passes of one gradient check (installed with pytest's
    ``monkeypatch``, so they are undone after the test).

    * Kinks: ``start_pass()`` before a forward pass, ``branches()`` after it returns the
      pass's discrete decisions, a list of arrays.
    * Stop-gradients: the first forward pass runs in ``"record"`` mode and stores the
      value of every stop-gradient site (the refined references, and for two-stage the
      selected proposals and the initial reference built from them); in ``"replay"``
      mode the finite-difference passes (no_grad) get the stored values, while a pass
      with gradients gets the live ones, so the analytic gradient is exactly what the
      model's own graph gives (a missing detach would show as a mismatch).
    * Matching: computed in the record pass, replayed in every later pass.
    """

    def __init__(self, monkeypatch, two_stage):
        self.mode = "record"
        self.two_stage = two_stage
        self.decisions = []
        self.stored = {}            # (site, call number in its pass) -> record-pass value
        self.calls = {}             # site -> calls so far in the current pass
        self.analytic = True        # whether the current pass records a graph
        for name in ("relu", "abs", "maximum", "minimum", "clamp"):
            monkeypatch.setattr(F, name, getattr(self, "_" + name)(getattr(F, name)))
        sampling = MSDeformAttn.sampling_locations_and_weights
        monkeypatch.setattr(MSDeformAttn, "sampling_locations_and_weights",
                            self._cells(sampling))
        monkeypatch.setattr(dt.DeformableTransformer, "forward",
                            self._transformer_forward(dt.DeformableTransformer.forward))
        monkeypatch.setattr(dt.DeformableTransformerDecoder, "forward",
                            self._decoder_forward(dt.DeformableTransformerDecoder.forward))
        monkeypatch.setattr(dt, "box_from_reference", self._refined_box(dt.box_from_reference))
        monkeypatch.setattr(dt, "get_proposal_pos_embed",
                            self._proposal_embed(dt.get_proposal_pos_embed))

    def start_pass(self):
        """Call before every forward pass (outside no_grad if it is the analytic pass)."""
        self.calls, self.decisions = {}, []
        self.analytic = is_grad_enabled()   # the model's own no_grad blocks don't count

    def branches(self):
        return list(self.decisions)

    def _key(self, site):
        n = self.calls.get(site, 0)
        self.calls[site] = n + 1
        return site, n

    def stop_gradient(self, site, live):
        """The value of a stop-gradient site (see the class docstring)."""
        key = self._key(site)
        if self.mode == "record":
            assert self.analytic, "record with gradients on, like the analytic pass"
            self.stored[key] = live
        return live if self.analytic else self.stored[key]

    def matcher(self, hungarian):
        """A matcher that replays the matchings of the record pass."""
        def match(outputs, targets):
            key = self._key("matching")
            if self.mode == "record":
                self.stored[key] = hungarian(outputs, targets)
            return self.stored[key]
        return match

    # ---- kinks: record on which side of each kink every element is
    def _relu(self, relu):
        def wrapped(x):
            self.decisions.append(as_array(x) > 0)
            return relu(x)
        return wrapped

    def _abs(self, abs_):
        def wrapped(x):
            self.decisions.append(np.sign(as_array(x)))
            return abs_(x)
        return wrapped

    def _maximum(self, maximum):
        def wrapped(a, b):
            self.decisions.append(np.sign(as_array(a) - as_array(b)))
            return maximum(a, b)
        return wrapped

    _minimum = _maximum

    def _clamp(self, clamp):
        def wrapped(x, lo=None, hi=None):
            for bound in (lo, hi):
                if bound is not None:
                    self.decisions.append(np.sign(as_array(x) - bound))
            return clamp(x, lo, hi)
        return wrapped

    def _cells(self, sampling_locations_and_weights):
        """Bilinear sampling has kinks where a point crosses a pixel centre: record the
        integer part of every point's pixel coordinates (x W_l - 0.5, y H_l - 0.5)."""
        def wrapped(module, query, reference_points, input_spatial_shapes):
            locations, weights = sampling_locations_and_weights(
                module, query, reference_points, input_spatial_shapes)
            size = np.asarray(input_spatial_shapes)[:, ::-1]                # (L, 2) (W_l, H_l)
            pixels = locations.data * size[:, None, :] - 0.5               # (N, Lq, M, L, K, 2)
            self.decisions.append(np.floor(pixels).astype(np.int64))
            return locations, weights
        return wrapped

    # ---- stop-gradient sites
    def _refined_box(self, box_from_reference):
        """The decoder's refinement (the only caller of dt.box_from_reference)."""
        def wrapped(delta, reference):
            return self.stop_gradient("refined reference", box_from_reference(delta, reference))
        return wrapped

    def _proposal_embed(self, get_proposal_pos_embed):
        """Two-stage: the embedding of the selected (detached) proposals."""
        def wrapped(proposals, *args, **kwargs):
            return get_proposal_pos_embed(self.stop_gradient("proposals", proposals),
                                          *args, **kwargs)
        return wrapped

    def _decoder_forward(self, forward):
        """Two-stage: the initial reference, sigmoid(detached proposals), into the decoder."""
        def wrapped(decoder, tgt, reference_points, *args, **kwargs):
            if self.two_stage:
                reference_points = self.stop_gradient("decoder reference", reference_points)
            return forward(decoder, tgt, reference_points, *args, **kwargs)
        return wrapped

    def _transformer_forward(self, forward):
        """Two-stage: ... and the same initial reference, returned to the box heads."""
        def wrapped(transformer, *args, **kwargs):
            out = forward(transformer, *args, **kwargs)
            if self.two_stage:
                out = out._replace(init_reference=self.stop_gradient("init_reference",
                                                                     out.init_reference))
            return out
        return wrapped


# --------------------------------------------------------------------------- the problem
def generic_model(variant):
    """The tiny model in float64, dropout off, moved off the kinks of its initialisation."""
    cfg = get_config("tiny", variant, dropout=0.0, msda_backend="numpy")
    model = build_model(cfg).eval().astype(np.float64)
    rng = np.random.default_rng(1)
    for name, p in model.named_parameters():
        if np.all(p.data == p.data.reshape(-1)[0]) or name.endswith("sampling_offsets.bias"):
            p.data += rng.normal(0.0, 0.1, size=p.shape)
    return cfg, model


def padded_batch():
    """Two 40 x 40 images; the second is valid on its top-left 32 x 24 only."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 40, 40))
    mask = np.zeros((2, 40, 40), dtype=bool)
    mask[1, 32:, :] = True
    mask[1, :, 24:] = True
    images[np.broadcast_to(mask[:, None], images.shape)] = 0.0
    return images, mask


def prediction_sets(out):
    """The final, auxiliary and (two-stage) encoder predictions, in a fixed order."""
    sets = [out] + list(out.get("aux_outputs", []))
    if "enc_outputs" in out:
        sets.append(out["enc_outputs"])
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_model_gradients_match_finite_differences(variant, monkeypatch):
    start = time.perf_counter()
    cfg, model = generic_model(variant)
    images, mask = padded_batch()
    criterion = build_criterion(cfg)
    instruments = Instruments(monkeypatch, two_stage=(variant == "two-stage"))
    criterion.matcher = instruments.matcher(criterion.matcher)
    rng = np.random.default_rng(2)
    weights = None                          # G, H: one pair per prediction set

    def objectives(m):
        nonlocal weights
        instruments.start_pass()
        out = m(images, mask)
        sets = prediction_sets(out)
        if weights is None:
            weights = [(rng.normal(size=s["pred_logits"].shape),
                        rng.normal(size=s["pred_boxes"].shape)) for s in sets]
        smooth = sum(((s["pred_logits"] * g).sum() + (s["pred_boxes"] * h).sum()
                      for s, (g, h) in zip(sets, weights)), Tensor(np.zeros(())))
        return {"criterion": criterion.total(criterion(out, TARGETS)), "outputs": smooth}

    objectives(model)                       # the record pass
    instruments.mode = "replay"
    assert ("matching", 0) in instruments.stored
    if variant != "plain":                  # the detached values really are replayed
        assert ("refined reference", 1) in instruments.stored
    if variant == "two-stage":
        assert {("proposals", 0), ("decoder reference", 0), ("init_reference", 0)} \
            <= set(instruments.stored)
    result = gradcheck_module(model, objectives, PARAMS[variant], n_elements_per_param=2,
                              eps=1e-6, tol=1e-6, seed=3, branches=instruments.branches)
    n_checked = sum(len(v) for v in result.checked.values())
    assert n_checked == 2 * len(PARAMS[variant])
    # no vacuous check: every parameter listed really moves an objective
    # (in_proj_bias is not listed: a third of it, the key bias, has exactly zero gradient,
    # since adding the same q.b_k to all of a query's scores leaves the softmax unchanged)
    weakest = min(result.largest, key=result.largest.get)
    assert result.largest[weakest] > 1e-3, f"{weakest}: gradient {result.largest[weakest]:.3g}"
    print(f"{variant}: {result} in {time.perf_counter() - start:.1f} s")


def test_initialisation_samples_on_bilinear_kinks(monkeypatch):
    """Why the model is moved before checking: at the official initialisation the encoder
    samples every token's own level at whole-pixel offsets from the token's pixel centre,
    i.e. exactly on kinks of bilinear sampling; after the move no sample is near one."""
    cfg = get_config("tiny", "plain", dropout=0.0, msda_backend="numpy")
    model = build_model(cfg).eval().astype(np.float64)
    images, mask = padded_batch()
    mask[:] = False                          # no padding: pixel centres on every level
    seen = []
    sampling = MSDeformAttn.sampling_locations_and_weights

    def spy(module, query, reference_points, shapes):
        locations, weights = sampling(module, query, reference_points, shapes)
        size = np.asarray(shapes)[:, ::-1]
        seen.append(locations.data * size[:, None, :] - 0.5)              # pixel coordinates
        return locations, weights

    monkeypatch.setattr(MSDeformAttn, "sampling_locations_and_weights", spy)
    model(images, mask)
    pixels = seen[0]                                 # encoder layer 0: (N, S, M, L, K, 2)
    on_kink = (np.abs(pixels - np.round(pixels)) < 1e-9).all(axis=-1)     # (N, S, M, L, K)
    start = 0
    for lvl, (H, W) in enumerate([(5, 5), (3, 3), (2, 2)]):   # 40 x 40: strides 8, 16, 32
        assert on_kink[:, start:start + H * W, :, lvl].all(), f"level {lvl}"
        start += H * W
    assert start == pixels.shape[1]
    _, moved = generic_model("plain")
    seen.clear()
    moved(images, mask)
    assert (np.abs(seen[0] - np.round(seen[0])) < 1e-6).sum() == 0


# --------------------------------------------------------------------------- the helper itself
class _WrongSquare(Function):
    """x^2 with a wrong backward (3x instead of 2x): gradcheck_module must catch it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x


class _Toy(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.w = nn.Parameter(np.asarray(values, dtype=np.float64))


def test_gradcheck_module_names_the_parameter_and_element_of_a_wrong_gradient():
    toy = _Toy([0.5, -1.0, 2.0])
    with pytest.raises(GradcheckError, match=r"parameter 'w' at index \(\d,\): analytic"):
        gradcheck_module(toy, lambda m: _WrongSquare.apply(m.w).sum(), ["w"])
    result = gradcheck_module(toy, lambda m: (m.w * m.w).sum(), ["w"])
    assert result.max_error < 1e-8 and sorted(result.checked["w"]) == [0, 1, 2]


def test_gradcheck_module_skips_elements_at_a_kink():
    """relu at exactly 0 has no derivative: that element is skipped, the others checked."""
    toy = _Toy([0.5, 0.0, -2.0, 1.5])
    signs = []

    def loss(m):
        signs[:] = [np.sign(m.w.data)]
        return (F.relu(m.w) * np.array([1.0, 2.0, 3.0, 4.0])).sum()

    result = gradcheck_module(toy, loss, ["w"], n_elements_per_param=4,
                              branches=lambda: list(signs))
    assert result.skipped["w"] == [1] and sorted(result.checked["w"]) == [0, 2, 3]
    with pytest.raises(GradcheckError, match="analytic"):     # without the fingerprint
        gradcheck_module(toy, loss, ["w"], n_elements_per_param=4)
