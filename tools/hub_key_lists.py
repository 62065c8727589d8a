"""Write the exact key lists (name and shape) of transformers' Deformable DETR checkpoints.

The hub files ``SenseTime/deformable-detr``, ``SenseTime/deformable-detr-with-box-refine``
and ``SenseTime/deformable-detr-with-box-refine-two-stage`` hold the state dict of
``DeformableDetrForObjectDetection`` built from their ``config.json`` (a timm ResNet-50
backbone, ``use_timm_backbone=True``; 91 labels; refine / two-stage flags), as
transformers 4 named it when they were converted and loaded strictly. This script builds
that model with the transformers (and timm) installed -- never a minidetr dependency -- and
writes one ``key shape`` line per entry of its ``state_dict()``, in order, to
``tests/weights/fixtures/keys/``::

    pip install torch torchvision timm "transformers<5"     # the hub files' naming
    python tools/hub_key_lists.py                            # -> transformers4-*.txt
    pip install "transformers>=5"                            # transformers 5's naming
    python tools/hub_key_lists.py                            # -> transformers5-*.txt

``tests/weights/test_hub_key_lists.py`` converts every list to official names (with no
torch) and checks it against the official key list of the ``paper`` model: 561, 597 and
630 keys and shapes.
"""
from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "weights" / "fixtures" / "keys"
HUB = {"deformable-detr": dict(with_box_refine=False, two_stage=False),
       "deformable-detr-with-box-refine": dict(with_box_refine=True, two_stage=False),
       "deformable-detr-with-box-refine-two-stage": dict(with_box_refine=True, two_stage=True)}


def key_list(flags) -> list[str]:
    """``key shape`` lines of the hub model with these flags."""
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(use_timm_backbone=True, backbone="resnet50",
                                  use_pretrained_backbone=False, num_labels=91, **flags)
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config)
    return [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()]


def saved_key_list(variant) -> list[str]:
    """``key shape`` lines of the ``model.safetensors`` that ``save_pretrained`` writes for
    minidetr's ``small`` preset (transformers' own ResNet-18 backbone, ``hf_config``): what
    a file fine-tuned with transformers holds (tied copies are not written)."""
    import sys
    import tempfile

    import torch
    from safetensors import safe_open
    from transformers import DeformableDetrForObjectDetection

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from minidetr.bench.train_hf import hf_config
    from minidetr.models import get_config

    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(hf_config(get_config("small", variant)))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with safe_open(f"{folder}/model.safetensors", framework="np") as f:
            return [f"{k} {tuple(f.get_slice(k).get_shape())}" for k in f.keys()]


def write_list(name, header, lines):
    path = OUT / name
    path.write_text(f"# {header}\n" + "\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} keys")


def main():
    import transformers

    version = transformers.__version__
    major = version.split(".")[0]
    OUT.mkdir(parents=True, exist_ok=True)
    for variant in ("plain", "refine", "two-stage"):
        write_list(f"transformers{major}-saved-small-{variant}.txt",
                   f"save_pretrained of minidetr's small preset ({variant}), transformers "
                   f"{version}, its own ResNet-18: the keys in the file", saved_key_list(variant))
    for name, flags in HUB.items():
        write_list(f"transformers{major}-{name}.txt",
                   f"SenseTime/{name}: DeformableDetrForObjectDetection state_dict, transformers "
                   f"{version}, timm ResNet-50", key_list(flags))


if __name__ == "__main__":
    main()
