"""The exact key lists of transformers' Deformable DETR files convert to the official ones.

``fixtures/keys/`` holds, one ``key shape`` line per entry, the state dicts that
``tools/hub_key_lists.py`` listed with transformers installed:

* ``transformers4-<hub name>.txt``: ``DeformableDetrForObjectDetection`` as the hub files
  ``SenseTime/deformable-detr``, ``-with-box-refine`` and ``-with-box-refine-two-stage`` hold
  it (transformers 4.46, timm ResNet-50; loaded strictly from those files);
* ``transformers5-<hub name>.txt``: the same model's ``state_dict()`` in transformers 5;
* ``transformers5-saved-small-<variant>.txt``: the keys ``save_pretrained`` writes (tied
  heads once, hub-era names) for minidetr's ``small`` preset with transformers' own ResNet-18.

Each list is turned into arrays of its shapes (zero-strided, no memory) and converted with
no torch: the result must be exactly the official model's keys and shapes.
"""
from pathlib import Path

import numpy as np
import pytest

from minidetr.models import build_model, get_config
from minidetr.weights.convert import convert_detector
from minidetr.weights.sources import WeightsSource

KEYS = Path(__file__).parent / "fixtures" / "keys"
HUB = {"deformable-detr": "plain", "deformable-detr-with-box-refine": "refine",
       "deformable-detr-with-box-refine-two-stage": "two-stage"}
OFFICIAL_COUNTS = {"plain": 561, "refine": 597, "two-stage": 630}


def read_list(path):
    arrays = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split(" ", 1)
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        arrays[key] = np.broadcast_to(np.float32(0), dims)
    return arrays


def expected_keys(preset, variant):
    model = build_model(get_config(preset, variant))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


CASES = [pytest.param(f"transformers{v}-{hub}.txt", "paper", variant, id=f"{v}-{variant}")
         for v in (4, 5) for hub, variant in HUB.items()] + \
        [pytest.param(f"transformers5-saved-small-{variant}.txt", "small", variant,
                      id=f"saved-small-{variant}") for variant in HUB.values()]


@pytest.mark.parametrize("name, preset, variant", CASES)
def test_key_list_converts_to_the_official_keys(name, preset, variant):
    arrays = read_list(KEYS / name)
    hf_config = {"encoder_attention_heads": 8, "two_stage_num_proposals":
                 get_config(preset).num_queries}
    src = WeightsSource(KEYS / name, "safetensors", arrays, hf_config=hf_config)
    ckpt, report = convert_detector(src, variant=variant, config=preset)
    want = expected_keys(preset, variant)
    got = {k: tuple(np.shape(v)) for k, v in ckpt.model_state.items()}
    assert sorted(set(got) ^ set(want)) == [], "key sets differ"
    assert got == want
    if preset == "paper":
        assert len(got) == OFFICIAL_COUNTS[variant]


@pytest.mark.shared
def test_hub_plain_list_is_the_released_checkpoints(shared_dir):
    """The plain hub list, converted, is the released r50 checkpoint's key list, in order."""
    official = [line.split(" ", 1)[0] for line in
                (shared_dir / "reference" / "official-state-dict-r50.txt").read_text().splitlines()
                if line.strip()]
    src = WeightsSource(KEYS / "x", "safetensors",
                        read_list(KEYS / "transformers4-deformable-detr.txt"))
    ckpt, _ = convert_detector(src, variant="plain", config="paper")
    assert list(ckpt.model_state) == official
