"""minidetr: Deformable DETR rebuilt from scratch in NumPy (CPU) and CuPy (GPU)."""
__version__ = "0.1.0"


def build_model(cfg):
    """The Deformable DETR detector of ``cfg`` (a ``minidetr.models.get_config(...)``).

    Shortcut for :func:`minidetr.models.build.build_model`, imported on first use so that
    ``import minidetr`` stays light.
    """
    from .models.build import build_model as _build_model
    return _build_model(cfg)
