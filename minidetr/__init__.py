"""minidetr: Deformable DETR rebuilt from scratch in NumPy (CPU) and CuPy (GPU)."""
__version__ = "0.1.0"
