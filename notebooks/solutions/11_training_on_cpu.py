"""Solutions to the exercises of notebook 11, training on the CPU.

Each ``exercise_N()`` runs in a few seconds on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.data.loader import Batch
from minidetr.models import build_criterion, build_model, get_config
from minidetr.optim import AdamW, StepLR
from minidetr.training import TrainConfig
from minidetr.training.engine import build_param_groups, train_step


def tiny_batch(seed=0, B=2, size=64):
    """Random images with two boxes each: enough for a real forward, loss and backward."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, 3, size, size)).astype(np.float32)
    mask = np.zeros((B, size, size), bool)
    targets = [{"labels": np.array([1, 3]),
                "boxes": np.array([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.25, 0.2]], np.float32),
                "size": np.array([size, size]), "orig_size": np.array([size, size]),
                "image_id": i} for i in range(B)]
    return Batch(images, mask, targets)


def exercise_1():
    """Predict the linear_proj group (lr x 0.1): the weight and bias of every sampling_offsets
    layer (encoder self-attention and decoder cross-attention) and of reference_points:
    2 (enc + dec) + 2 tensors, C * 2MLK + 2MLK numbers per attention and 2C + 2 for the
    reference point layer."""
    cfg = get_config("tiny")
    groups = {g["name"]: g for g in build_param_groups(build_model(cfg), TrainConfig())}
    C, M, L, K = cfg.d_model, cfg.nheads, cfg.num_feature_levels, cfg.n_points
    n_attn = cfg.enc_layers + cfg.dec_layers
    proj = groups["linear_proj"]
    assert len(proj["params"]) == 2 * n_attn + 2
    assert sum(p.data.size for p in proj["params"]) == n_attn * (C + 1) * 2 * M * L * K + 2 * C + 2
    assert proj["lr"] == groups["main"]["lr"] * 0.1


def exercise_2():
    """Measure the clipping: on an untrained model the gradient's norm is far above 0.1, so
    clipping rescales the step's gradient to norm 0.1 exactly (the direction is kept). Then
    predict what that does to AdamW's *first* update: almost nothing, because Adam divides
    the first moment by the root of the second, and a common factor cancels (up to eps).
    Clipping matters later, when one step's spike would otherwise dominate the moments."""
    def first_update(clip):
        cfg = get_config("tiny", seed=0, dropout=0.0)
        model = build_model(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.data.copy() for p in params]
        optimizer = AdamW([{"params": params, "lr": 1e-4}], weight_decay=0.0)
        values = train_step(model, build_criterion(cfg), optimizer, tiny_batch(),
                            clip_max_norm=clip)
        norm = np.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum())
                           for p in params if p.grad is not None))
        step = np.concatenate([(p.data - b).ravel() for p, b in zip(params, before)])
        return values["grad_norm"], norm, step

    raw, clipped_norm, clipped_step = first_update(0.1)
    _, unclipped_norm, free_step = first_update(0.0)          # <= 0: measure only
    print(f"gradient norm {raw:.2f} before clipping, {clipped_norm:.4f} after")
    assert raw > 1.0 and abs(clipped_norm - 0.1) < 1e-4 and abs(unclipped_norm - raw) < 1e-3
    moved = np.abs(free_step) > 1e-6                        # parameters that got a gradient
    assert np.median(np.abs(clipped_step[moved] - free_step[moved])) < 0.01 * 1e-4


def exercise_3():
    """Predict the learning rates per epoch of the notebook's recipe (8 epochs, drop after
    6) for the three groups, then step a StepLR through them."""
    train = TrainConfig(lr=5e-4, lr_backbone=5e-4, epochs=8, lr_drop=6)
    groups = build_param_groups(build_model(get_config("tiny")), train)
    optimizer = AdamW(groups, weight_decay=1e-4)
    schedule = StepLR(optimizer, train.lr_drop)
    seen = []
    for _ in range(train.epochs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        schedule.step()
    predicted = [[5e-4, 5e-4, 5e-5]] * 6 + [[5e-5, 5e-5, 5e-6]] * 2
    np.testing.assert_allclose(seen, predicted, rtol=1e-12)


def exercise_4():
    """Reproducibility: the same seeds give bit-identical parameters after a training step;
    another model seed gives different ones."""
    def one_step(seed):
        cfg = get_config("tiny", seed=seed, dropout=0.1)
        model = build_model(cfg)
        optimizer = AdamW(build_param_groups(model, TrainConfig()), weight_decay=1e-4)
        train_step(model.train(), build_criterion(cfg), optimizer, tiny_batch())
        return {n: p.data.copy() for n, p in model.named_parameters()}

    a, b, c = one_step(42), one_step(42), one_step(7)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert any(not np.array_equal(a[n], c[n]) for n in a)
