"""Operations with hand-written kernels, beside their slow, obvious references.

``minidetr.ops.msda``: multi-scale deformable attention (Eq. 2 and Eq. 3 of the paper),
with a NumPy reference, a Numba CPU backend and GPU backends, one plain-array API and one
autograd Function.
"""
