"""Parameter-free layers: ReLU, Identity and Dropout.

Dropout keeps its own NumPy Generator (``self.rng``), so masks are reproducible and a
model's dropout streams can be re-seeded (``Module.seed_dropout``) and saved/restored
(``Module.rng_state`` / ``set_rng_state``) without any global random state.

Shapes: any input shape; the output has the same shape.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from . import _checks
from .module import Module


class ReLU(Module):
    """max(x, 0) elementwise."""

    def forward(self, x):
        return F.relu(x)


class Identity(Module):
    """Returns its first argument unchanged (a placeholder layer)."""

    def forward(self, x, *args, **kwargs):
        return x


class Dropout(Module):
    """In training, zero each element with probability ``p`` and scale the rest by 1/(1-p).

    In evaluation (``module.eval()``) it returns the input unchanged.
    """

    has_rng = True          # Module.seed_dropout / rng_state / set_rng_state find it

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        self.p = _checks.probability(p, "p", "Dropout")
        if rng is not None and not isinstance(rng, np.random.Generator):
            raise TypeError(f"Dropout: rng must be a numpy.random.Generator or None, "
                            f"got {type(rng).__name__}")
        self.rng = np.random.default_rng() if rng is None else rng

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.rng)

    def extra_repr(self):
        return f"p={self.p}"
