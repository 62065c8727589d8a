"""Two small training examples that show the whole loop on the CPU in seconds.

* :func:`train_mlp`: an :class:`~minidetr.nn.MLP` learns whether a 2-D point lies inside
  a circle (two classes, a margin around the boundary so the problem is separable).
* :func:`train_tiny_cnn`: Conv2d -> GroupNorm -> ReLU -> max-pool -> Linear learns which
  quadrant of a noisy 12x12 image holds a bright square (four classes).

Both use the pieces a detector uses: Modules, cross-entropy built from ``log_softmax``,
``backward()``, :func:`~minidetr.optim.clip_grad_norm_`, :class:`~minidetr.optim.AdamW`
and :class:`~minidetr.optim.StepLR`. Every batch is drawn fresh from a seeded generator,
so a falling loss means the model generalises, not that it memorised.

``python -m minidetr.lessons.examples`` runs :func:`run_demo`, which writes ``metrics.jsonl`` and
``loss.png`` into its run folder. (The main job, ``python -m minidetr demo``, trains the
detector itself: see :mod:`minidetr.training`.)
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import functional as F
from .. import nn
from ..autograd import Tensor, no_grad
from ..optim import AdamW, StepLR, clip_grad_norm_
from ..training.plots import new_figure, save_figure
from ..training.run_dir import write_metrics

IMAGE_SIZE = 12           # synthetic images are 1 x 12 x 12; each quadrant is 6 x 6
SQUARE = 3                # the bright square is 3 x 3


# --------------------------------------------------------------------------- data
def make_points(n: int, rng: np.random.Generator):
    """n points in [-1, 1]^2 with label 1 inside the circle of radius 0.6, 0 outside.

    Points within 0.1 of the circle are redrawn, so the classes are separated by a margin.

    Shapes: returns x (n, 2) float32, y (n,) int64.
    """
    points = np.empty((0, 2))
    while len(points) < n:
        p = rng.uniform(-1.0, 1.0, size=(2 * n, 2))
        radius = np.sqrt((p ** 2).sum(axis=1))
        points = np.concatenate([points, p[np.abs(radius - 0.6) > 0.1]])
    points = points[:n]
    labels = (np.sqrt((points ** 2).sum(axis=1)) < 0.6).astype(np.int64)
    return points.astype(np.float32), labels


def make_quadrant_images(n: int, rng: np.random.Generator):
    """n noisy images with a bright 3x3 square in one quadrant; the label is the quadrant.

    Quadrants: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. The square sits at
    a random position inside its quadrant; the background is N(0, 0.2^2) noise.

    Shapes: returns images (n, 1, 12, 12) float32, labels (n,) int64.
    """
    half = IMAGE_SIZE // 2
    images = rng.normal(0.0, 0.2, size=(n, 1, IMAGE_SIZE, IMAGE_SIZE))
    labels = rng.integers(0, 4, size=n)
    offsets = rng.integers(0, half - SQUARE + 1, size=(n, 2))        # (n, 2) row, col
    for i in range(n):
        top = (labels[i] // 2) * half + offsets[i, 0]
        left = (labels[i] % 2) * half + offsets[i, 1]
        images[i, 0, top:top + SQUARE, left:left + SQUARE] += 1.0
    return images.astype(np.float32), labels.astype(np.int64)


# --------------------------------------------------------------------------- models
class TinyCNN(nn.Module):
    """Conv3x3(1->8) -> GroupNorm(2, 8) -> ReLU -> MaxPool2 -> Linear(8*6*6 -> 4).

    Shapes: images (N, 1, 12, 12) -> logits (N, 4).
    """

    def __init__(self, rng: np.random.Generator, channels: int = 8, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1, rng=rng)
        self.norm = nn.GroupNorm(2, channels)
        self.head = nn.Linear(channels * (IMAGE_SIZE // 2) ** 2, num_classes, rng=rng)

    def forward(self, images):
        x = F.relu(self.norm(self.conv(images)))              # (N, 8, 12, 12)
        x = F.max_pool2d(x, 2)                                 # (N, 8, 6, 6)
        x = x.flatten(1)                                       # (N, 8*6*6)
        return self.head(x)                                    # (N, 4)


def cross_entropy(logits, labels):
    """Mean of -log softmax(logits)[label] over the batch.

    Shapes: logits (N, K), labels (N,) integers -> scalar.
    """
    log_probs = F.log_softmax(logits, axis=-1)                 # (N, K)
    picked = log_probs[np.arange(len(labels)), labels]         # (N,)
    return -picked.mean()


# --------------------------------------------------------------------------- training
def _fit(model, make_batch, steps: int, lr: float, seed: int, progress: bool, desc: str):
    """The training loop shared by both examples; returns the per-step history.

    AdamW (weight decay 1e-4), gradient clipping at norm 1.0, and the learning rate
    divided by 10 after two thirds of the steps (StepLR, stepped once per iteration).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    data_rng = np.random.default_rng(seed + 1)     # data stream, separate from the init
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = StepLR(optimizer, step_size=max(1, (2 * steps) // 3), gamma=0.1)
    history = {"loss": [], "lr": [], "grad_norm": []}
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        inputs, labels = make_batch(data_rng)
        loss = cross_entropy(model(Tensor(inputs)), labels)
        optimizer.zero_grad()
        loss.backward()
        history["grad_norm"].append(clip_grad_norm_(model.parameters(), max_norm=1.0))
        history["lr"].append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        history["loss"].append(float(loss.item()))
    return history


def _accuracy(model, inputs, labels) -> float:
    """Fraction of correctly classified samples (evaluation mode, no graph)."""
    model.eval()
    with no_grad():
        logits = model(Tensor(inputs))
    model.train()
    return float((logits.numpy().argmax(axis=-1) == labels).mean())


def _build_mlp(seed):
    return nn.MLP(2, 32, 2, num_layers=3, rng=np.random.default_rng(seed))


def _build_cnn(seed):
    return TinyCNN(np.random.default_rng(seed))


def train_mlp(steps: int = 300, seed: int = 0, progress: bool = True) -> list:
    """Train the circle classifier; returns the training loss of every step."""
    model = _build_mlp(seed)
    history = _fit(model, lambda rng: make_points(64, rng), steps, lr=1e-2, seed=seed,
                   progress=progress, desc="mlp")
    return history["loss"]


def train_tiny_cnn(steps: int = 300, seed: int = 0, progress: bool = True) -> list:
    """Train the quadrant classifier; returns the training loss of every step."""
    model = _build_cnn(seed)
    history = _fit(model, lambda rng: make_quadrant_images(32, rng), steps, lr=1e-2,
                   seed=seed, progress=progress, desc="tiny cnn")
    return history["loss"]


# --------------------------------------------------------------------------- demo
def _plot(histories: dict, path: Path):
    fig = new_figure(6, 4)
    ax = fig.subplots()
    for name, history in histories.items():
        ax.plot(np.arange(1, len(history["loss"]) + 1), history["loss"], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("minidetr demo: AdamW + clipping + StepLR")
    ax.legend()
    save_figure(fig, path)


def run_demo(steps: int = 300, seed: int = 0, out_dir: str = "runs/examples",
             progress: bool = True) -> dict:
    """Train both examples, print a summary, write metrics.jsonl and loss.png to out_dir.

    Returns the summary (per model: first/last loss, held-out accuracy, seconds).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"minidetr demo: {steps} steps per model, seed {seed}, writing to {out}/")
    runs = {
        "mlp": (_build_mlp, lambda rng: make_points(64, rng), lambda rng: make_points(512, rng)),
        "tiny_cnn": (_build_cnn, lambda rng: make_quadrant_images(32, rng),
                     lambda rng: make_quadrant_images(512, rng)),
    }
    histories, summary = {}, {}
    for name, (build, make_batch, make_test) in runs.items():
        start = time.perf_counter()
        model = build(seed)
        history = _fit(model, make_batch, steps, lr=1e-2, seed=seed, progress=progress,
                       desc=name)
        seconds = time.perf_counter() - start
        test_inputs, test_labels = make_test(np.random.default_rng(seed + 1000))
        accuracy = _accuracy(model, test_inputs, test_labels)
        histories[name] = history
        summary[name] = {"first_loss": history["loss"][0], "last_loss": history["loss"][-1],
                         "test_accuracy": accuracy, "seconds": round(seconds, 2),
                         "parameters": model.num_parameters()}
        print(f"  {name:9s} loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, "
              f"held-out accuracy {accuracy:.1%} ({len(test_labels)} samples), "
              f"{model.num_parameters()} parameters, {seconds:.1f} s")

    write_metrics(out, [{"model": name, "step": step, "loss": loss, "lr": lr, "grad_norm": norm}
                        for name, history in histories.items()
                        for step, (loss, lr, norm) in enumerate(
                            zip(history["loss"], history["lr"], history["grad_norm"]), start=1)])
    _plot(histories, out / "loss.png")
    print(f"  wrote {out / 'metrics.jsonl'} and {out / 'loss.png'}")
    return summary


if __name__ == "__main__":
    run_demo()
