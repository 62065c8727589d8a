"""Tests of minidetr.lessons.examples: the small models really learn, the demo writes its files."""
from __future__ import annotations

import json

import numpy as np

from minidetr.lessons import examples


def test_tiny_cnn_reaches_near_zero_loss():
    losses = examples.train_tiny_cnn(steps=100, seed=0, progress=False)
    assert len(losses) == 100
    assert losses[0] > 1.0                                  # about ln 4 at the start
    assert max(losses[-10:]) < 0.01, losses[-10:]           # fresh batches: it generalises


def test_mlp_reaches_near_zero_loss():
    losses = examples.train_mlp(steps=300, seed=0, progress=False)
    assert losses[0] > 0.5                                  # about ln 2 at the start
    assert np.mean(losses[-20:]) < 0.1, losses[-20:]


def test_training_is_deterministic_for_a_seed():
    a = examples.train_tiny_cnn(steps=5, seed=3, progress=False)
    b = examples.train_tiny_cnn(steps=5, seed=3, progress=False)
    c = examples.train_tiny_cnn(steps=5, seed=4, progress=False)
    assert a == b and a != c


def test_quadrant_images_put_the_square_in_the_labelled_quadrant():
    images, labels = examples.make_quadrant_images(64, np.random.default_rng(0))
    assert images.shape == (64, 1, 12, 12) and images.dtype == np.float32
    quadrant_sums = images[:, 0].reshape(64, 2, 6, 2, 6).sum(axis=(2, 4)).reshape(64, 4)
    np.testing.assert_array_equal(quadrant_sums.argmax(axis=1), labels)


def test_run_demo_writes_metrics_and_plot(tmp_path, capsys):
    summary = examples.run_demo(steps=30, seed=1, out_dir=str(tmp_path / "demo"), progress=False)
    out = capsys.readouterr().out
    assert "seed 1" in out and "tiny_cnn" in out
    assert set(summary) == {"mlp", "tiny_cnn"}
    assert summary["tiny_cnn"]["last_loss"] < summary["tiny_cnn"]["first_loss"]
    lines = (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 60 and set(records[0]) == {"model", "step", "loss", "lr", "grad_norm"}
    assert (tmp_path / "demo" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


