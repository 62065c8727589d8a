"""Shared test fixtures.

* ``xp``: parametrises a test over the array backends: NumPy; the NumPy-backed stand-in
  ``minidetr.testing.fakecupy``, which fails on what CuPy would refuse (always); and CuPy when a
  GPU is present (skipped with the reason otherwise), so every check also runs on the GPU.
* ``device_cupy``: for code that only runs on a GPU: fakecupy always, CuPy with a GPU.
* ``shared_dir``: the ../shared folder beside the repository (skipped in a user's clone).
* ``small_config``: ``small_config(variant, **overrides)`` is the ModelConfig of a detector
  small enough to train two epochs on ``shapes_data`` in about a second.
* ``shapes_data`` / ``shapes_paths``: a small built-in shapes dataset (12 training and 4
  validation images of 64 x 64), made once per test session (per xdist worker), as
  ``ShapesPaths`` and as the training code's ``DataPaths``.
* Hypothesis: a small, derandomised "ci" profile, so runs are reproducible and fast.
"""
from __future__ import annotations

import os

# The tests use tiny arrays: BLAS threads, and minidetr's own blocks of large products
# (minidetr/functional/_parallel.py), only fight over the CI machine's two cores (and
# pytest-xdist already runs two workers). tests/core/test_parallel.py sets the thread
# count it tests explicitly. Set before NumPy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MINIDETR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minidetr.backend import cupy_available, why_no_cupy

settings.register_profile(
    "ci", max_examples=int(os.environ.get("MINIDETR_HYPOTHESIS_EXAMPLES", "20")),
    deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("MINIDETR_HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _xp_params():
    return [pytest.param("numpy", id="numpy"),
            pytest.param("fakecupy", id="fakecupy"),
            pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=_xp_params())
def xp(request):
    """The array module to test with: numpy; minidetr.testing.fakecupy (CuPy's strictness about
    host arrays and host copies, NumPy's arithmetic; runs everywhere); cupy when a GPU
    is present."""
    if request.param == "cupy":
        if not cupy_available():
            pytest.skip(f"GPU backend not tested: {why_no_cupy()}")
        import cupy
        yield cupy
    elif request.param == "fakecupy":
        from minidetr.testing import fakecupy
        with fakecupy.installed() as fake:
            yield fake
    else:
        yield np


@pytest.fixture(params=[pytest.param("fakecupy", id="fakecupy"),
                        pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)])
def device_cupy(request):
    """CuPy for tests of GPU-only code paths (training step, benchmarks): the stand-in
    minidetr.testing.fakecupy everywhere, and the real CuPy where a GPU is present."""
    if request.param == "cupy":
        if not cupy_available():
            pytest.skip(f"GPU path not tested on a real GPU: {why_no_cupy()}")
        import cupy
        yield cupy
    else:
        from minidetr.testing import fakecupy
        with fakecupy.installed() as fake:
            yield fake


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: tests that use the shared COCO sample only run in "
                    "CI or in a checkout with ../shared beside it")
    return SHARED


# A detector small enough for a 2-epoch run on shapes_data in about a second.
SMALL_MODEL = dict(d_model=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=32,
                   num_queries=6, tiny_channels=(8, 16, 16, 16))


@pytest.fixture(scope="session")
def small_config():
    """``make(variant="plain", **overrides)``: the ModelConfig of the small test detector."""
    from minidetr.models.config import get_config

    def make(variant="plain", **overrides):
        return get_config("tiny", variant, **{**SMALL_MODEL, **overrides})
    return make


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A small shapes dataset, made once per session: ``ShapesPaths`` (root, splits)."""
    from minidetr.data import generate_shapes_dataset

    root = tmp_path_factory.mktemp("shapes-data") / "shapes"
    return generate_shapes_dataset(root, num_train=12, num_val=4, image_size=(64, 64), seed=3,
                                   progress=False)


@pytest.fixture(scope="session")
def shapes_paths(shapes_data):
    """``shapes_data`` as the training code's ``DataPaths``."""
    from minidetr.training import DataPaths

    return DataPaths.from_shapes(shapes_data)


@pytest.fixture
def rng():
    """A seeded NumPy generator; the seed is in the test id through the fixture's name."""
    return np.random.default_rng(12345)


def pytest_terminal_summary(terminalreporter):
    """One line per distinct skip reason, with a count (instead of one line per test)."""
    from collections import Counter
    reasons = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.write_sep("-", "skipped tests, by reason")
        for reason, n in reasons.most_common():
            terminalreporter.write_line(f"{n:5d} x {reason}")
