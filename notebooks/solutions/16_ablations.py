"""Solutions to the exercises of notebook 16, ablations against the paper's tables.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import dataclasses
import json
from types import SimpleNamespace

import numpy as np

from minidetr.lessons import experiments as ex
from minidetr.models import build_model, get_config


def exercise_1():
    """sampling_offsets: C inputs -> M*L*K*2 outputs, plus a bias; attention_weights:
    C -> M*L*K. At C = 64, M = 4, L = 3: 1560 / 780 parameters for K = 1, twice that for
    K = 2, four times for K = 4: linear in K."""
    C, M, L = 64, 4, 3
    for K in (1, 2, 4):
        predicted = (C * M * L * K * 2 + M * L * K * 2, C * M * L * K + M * L * K)
        attn = build_model(get_config("tiny", n_points=K)).transformer.encoder.layers[0].self_attn
        counted = (attn.sampling_offsets.num_parameters(), attn.attention_weights.num_parameters())
        print(K, predicted, counted)
        assert predicted == counted


def exercise_2():
    """A setting "M2": the tiny preset with two heads. Its config differs from the
    baseline's in nheads only, as an ablation must."""
    settings = dict(ex.SETTINGS)
    settings["M2"] = ex.Setting("M2", "plain", {"nheads": 2}, "deformable, M=2")
    m2 = get_config("tiny", settings["M2"].variant, **ex.PINNED_FIELDS(),
                    **settings["M2"].overrides)
    base = ex.setting_config("base")
    differ = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(m2, f.name)}
    assert differ == {"nheads"}, differ


def same_budget(entries):
    """The check the notebook makes: every run's stored train_config is identical."""
    return len({json.dumps(e["train_config"], sort_keys=True) for e in entries.values()}) == 1


def exercise_3():
    """Two runs with different budgets are caught by comparing the stored train_configs
    (and the cached results pass the same check)."""
    good = {n: {"train_config": dict(ex.BUDGET)} for n in ("base", "K1")}
    bad = {"base": {"train_config": dict(ex.BUDGET)},
           "K1": {"train_config": dict(ex.BUDGET, max_train_images=200)}}
    assert same_budget(good) and not same_budget(bad)
    if ex.RESULTS_PATH.is_file():
        cached = json.loads(ex.RESULTS_PATH.read_text(encoding="utf-8"))["settings"]
        assert same_budget(cached), "the cached runs had different budgets"


def exercise_4():
    """At 96 px: L=1 is C5 alone, 3 x 3 = 9 tokens; L=3 adds C3 (12 x 12) and C4 (6 x 6):
    144 + 36 + 9 = 189 tokens."""
    images = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    batch = SimpleNamespace(images=images, mask=np.zeros((2, 96, 96), bool))
    micro = dict(d_model=32, nheads=2, dim_feedforward=32, tiny_channels=(8, 16, 16, 16))
    for name, expected in (("L1", 9), ("base", 189)):
        tokens = ex.token_mask(build_model(ex.setting_config(name, **micro)), batch)
        assert tokens.shape == (2, expected) and tokens.all(), (name, tokens.shape)
