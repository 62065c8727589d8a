"""Solutions to the exercises of notebook 18, testing GPU code without a GPU.

Each ``exercise_N()`` runs in well under a second on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

import minidetr.nn as nn
from minidetr.backend import HostTransferError, allow_transfers, to_device, to_numpy, transfer_guard
from minidetr.optim import AdamW
from minidetr.testing import fakecupy


def outcome(fn):
    """'ok (n launches)', 'TypeError' or 'HostTransferError' for fn() on the fake device."""
    try:
        with transfer_guard(), fakecupy.count_launches() as launches:
            fn()
    except TypeError:
        return "TypeError"
    except HostTransferError:
        return "HostTransferError"
    return f"ok ({sum(launches.values())} launches)"


def exercise_1():
    """Predict which lines CuPy refuses or turns into a host copy: a host array as an
    operand (TypeError); float() and `if` on a device value (a copy, which the guard turns
    into a HostTransferError); a Python number as an operand and views are fine."""
    with fakecupy.installed():
        x = to_device(np.arange(4, dtype=np.float32), "cuda")
        results = {
            "x + np.ones(4)": outcome(lambda: x + np.ones(4, np.float32)),
            "x * 2.0": outcome(lambda: x * 2.0),
            "float(x.sum())": outcome(lambda: float(x.sum())),
            "if x.sum() > 0": outcome(lambda: bool(x.sum() > 0)),
            "x.reshape(2, 2).T": outcome(lambda: x.reshape(2, 2).T),
        }
    assert results == {"x + np.ones(4)": "TypeError", "x * 2.0": "ok (1 launches)",
                       "float(x.sum())": "HostTransferError",
                       "if x.sum() > 0": "HostTransferError",
                       "x.reshape(2, 2).T": "ok (0 launches)"}, results


def exercise_2():
    """Predict the launches: ((x * 2.0) + 1.0).sum() is three kernels; the same arithmetic
    written as one expression per element would be one (that is what an ElementwiseKernel
    fuses). The copy of the result to the host is allowed only inside allow_transfers."""
    with fakecupy.installed():
        x = to_device(np.arange(6, dtype=np.float32), "cuda")
        with fakecupy.count_launches() as launches:
            total = ((x * 2.0) + 1.0).sum()
        assert sum(launches.values()) == 3
        with transfer_guard() as copies:
            with allow_transfers("the result"):
                value = float(to_numpy(total))
        assert dict(copies) == {"the result": 1}
    assert value == float(((np.arange(6) * 2.0) + 1.0).sum())


def exercise_3():
    """Predict the readable AdamW's launches for P parameters: 14 per parameter and step,
    plus 2 per parameter on the first step (the two moments are created)."""
    shapes = [(8, 8), (8,), (3, 8)]
    rng = np.random.default_rng(0)
    with fakecupy.installed():
        params = [nn.Parameter(to_device(rng.standard_normal(s).astype(np.float32), "cuda"))
                  for s in shapes]
        optimizer = AdamW(params, lr=1e-2, weight_decay=1e-2, fused=False)
        counts = []
        for _ in range(3):
            for p in params:
                p.grad = to_device(rng.standard_normal(p.data.shape).astype(np.float32), "cuda")
            with fakecupy.count_launches() as launches:
                optimizer.step()
            counts.append(sum(launches.values()))
    P = len(shapes)
    assert counts == [16 * P, 14 * P, 14 * P], counts
