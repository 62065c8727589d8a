"""minidetr: Deformable DETR rebuilt from scratch in NumPy (CPU) and CuPy (GPU)."""
import os as _os

__version__ = "0.1.0"

# CPU threads, set before NumPy and Numba start theirs (a value already in the environment
# wins). minidetr cuts its large matrix products into blocks over the cores itself
# (minidetr/functional/_parallel.py), so BLAS runs one thread per call; and Numba's OpenMP
# workers sleep between two kernels instead of spinning on the cores those products need.
# Measured on 2 cores, `small` step: 470 ms (650 ms on one thread, 660 ms with spinning
# OpenMP workers). The numbers and the reasons: docs/profile.md, section 5.
# THREAD_SETTINGS_MADE names the variables set here, so that a child process that must
# not inherit them (transformers' rows of `bench train`) can leave them out.
THREAD_SETTINGS_MADE = tuple(
    _name for _name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
    if _name not in _os.environ)
for _name, _value in (("OPENBLAS_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"),
                      ("OMP_WAIT_POLICY", "PASSIVE")):
    _os.environ.setdefault(_name, _value)


def build_model(cfg):
    """The Deformable DETR detector of ``cfg`` (a ``minidetr.models.get_config(...)``).

    Shortcut for :func:`minidetr.models.build.build_model`, imported on first use so that
    ``import minidetr`` stays light.
    """
    from .models.build import build_model as _build_model
    return _build_model(cfg)
