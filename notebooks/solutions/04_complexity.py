"""Solutions to the exercises of notebook 04, complexity.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims (no
timings: they depend on the machine; formulas and memory do not).
``tests/lessons/test_solutions.py`` calls them all.
"""
import tracemalloc

import numpy as np

from minidetr.autograd import Tensor, no_grad
from minidetr.nn import MultiheadAttention
from minidetr.ops import msda


def exercise_1():
    """Predict where full attention's quadratic term overtakes the projections: the
    N_q N_k C = (HW)^2 C of QK^T and AV against the 2 HW C^2 of the key and value
    projections (the query and output ones are as large again): at HW = 2C for the first
    pair, 512 tokens for C = 256, a 23 x 23 map. The paper's C5 map of an 800 x 1066 image
    (25 x 34 = 850 tokens) is just past it, which is why DETR stopped there."""
    C = 256
    def quadratic(hw):
        return hw * hw * C

    def projections(hw):
        return 2 * hw * C**2
    crossover = next(hw for hw in range(1, 10_000) if quadratic(hw) > projections(hw))
    assert crossover == 2 * C + 1
    assert 22**2 < crossover <= 23**2
    assert quadratic(25 * 34) > projections(25 * 34)


def exercise_2():
    """Predict what training full attention on all of the paper's S = 19 947 tokens would
    keep for the backward pass: M S^2 float32 probabilities per layer, 12.7 GB, 76 GB for
    six encoder layers; DETR's single C5 map (850 tokens) keeps 23 MB per layer. Then
    measure the rule at a small size: with gradients enabled the forward pass must keep
    the (M, HW, HW) probabilities, without them it need not."""
    S, M = 19_947, 8
    assert round(M * S * S * 4 / 1e9, 1) == 12.7
    assert round(6 * M * S * S * 4 / 1e9) == 76
    assert round(M * 850**2 * 4 / 1e6) == 23

    C, heads, hw = 32, 4, 24 * 24
    layer = MultiheadAttention(C, heads, rng=np.random.default_rng(0))
    x = Tensor(np.random.default_rng(1).normal(size=(1, hw, C)).astype(np.float32),
               requires_grad=True)

    def kept_after_forward(grad):
        tracemalloc.start()
        if grad:
            out, _ = layer(x, x, x)                 # the graph keeps what backward needs
        else:
            with no_grad():
                out, _ = layer(x, x, x)
        kept = tracemalloc.get_traced_memory()[0]   # still allocated, not the peak
        tracemalloc.stop()
        del out
        return kept

    matrix = heads * hw * hw * 4
    with_grad, without = kept_after_forward(True), kept_after_forward(False)
    print(f"kept after the forward pass: {with_grad / 1e6:.1f} MB with gradients, "
          f"{without / 1e6:.1f} MB without; one (M, HW, HW) matrix is {matrix / 1e6:.1f} MB")
    assert with_grad - without >= matrix and without < matrix


def exercise_3():
    """The paper's min(HW C^2, N_q K C^2): the value projection W' can be applied to every
    token before sampling, or to the sampled points after it, because bilinear sampling
    and the weighted sum are linear. Prove the two give the same output, then predict
    which is cheaper: in the paper's decoder (300 queries x L K = 16 points against
    S = 19 947 tokens) projecting the samples is 4x cheaper; in the encoder (N_q = S) it
    would be 16x dearer."""
    rng = np.random.default_rng(0)
    N, S, C, M, L, K, Lq = 1, 6 * 8 + 3 * 4, 12, 3, 2, 2, 5
    D = C // M
    shapes, starts = np.array([[6, 8], [3, 4]]), np.array([0, 48])
    x = rng.normal(size=(N, S, C))                                       # raw features
    W_value = rng.normal(size=(C, C))                                    # W', all heads
    loc = rng.uniform(0, 1, size=(N, Lq, M, L, K, 2))
    attn = rng.dirichlet(np.ones(L * K), size=(N, Lq, M)).reshape(N, Lq, M, L, K)

    projected = (x @ W_value.T).reshape(N, S, M, D)                      # project, then sample
    first = msda.forward(projected, shapes, starts, loc, attn)           # (N, Lq, M*D)

    raw_per_head = np.broadcast_to(x[:, :, None, :], (N, S, M, C)).copy()  # every head: all C
    sampled = msda.forward(raw_per_head, shapes, starts, loc, attn).reshape(N, Lq, M, C)
    W_heads = W_value.reshape(M, D, C)                                   # W'_m: (D, C) each
    second = np.einsum("mdc,nqmc->nqmd", W_heads, sampled).reshape(N, Lq, M * D)
    np.testing.assert_allclose(second, first, rtol=1e-12, atol=1e-12)

    S_paper, Nq, LK = 19_947, 300, 16
    assert round(S_paper / (Nq * LK), 1) == 4.2                          # decoder: samples win
    assert S_paper * LK / S_paper == 16                                  # encoder: tokens win
