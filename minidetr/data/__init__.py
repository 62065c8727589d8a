"""Data: COCO-format datasets, augmentation, batching and the built-in shapes dataset.

The path of one training batch, top to bottom:

    paths = generate_shapes_dataset("data/shapes")                  # shapes.py (or real COCO)
    train = CocoDetection(*paths.split("train"),                    # coco.py
                          transforms=make_transforms("train", "tiny"),   # transforms.py
                          label_map="contiguous")
    loader = DataLoader(train, batch_size=8, shuffle=True, seed=0)  # loader.py
    for images, mask, targets in loader:                            # (B,3,H,W), (B,H,W), [dict]
        ...

``make_subset`` (subset.py) carves a small COCO subset out of a full download;
``preflight.preflight`` (preflight.py) checks every image of a split before training.
See docs/data.md.
"""
from .coco import (CategoryMap, CocoDetection, DatasetError, DatasetWarning, FirstImages,
                   load_coco_json, load_rgb_image, to_rgb8)
from .loader import Batch, DataLoader, collate, epoch_order, sample_rng
from .shapes import CLASSES as SHAPES_CLASSES
from .shapes import ShapesPaths, generate_shapes_dataset, render_shapes_image
from .subset import make_subset
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, PRESETS, AugmentationPreset, Compose,
                         Normalize, RandomHorizontalFlip, RandomResize, RandomSelect,
                         RandomSizeCrop, Resize, make_transforms, resize_size)

__all__ = [
    "CategoryMap", "CocoDetection", "DatasetError", "DatasetWarning", "FirstImages",
    "load_coco_json",
    "load_rgb_image", "to_rgb8",
    "Batch", "DataLoader", "collate", "epoch_order", "sample_rng",
    "SHAPES_CLASSES", "ShapesPaths", "generate_shapes_dataset", "render_shapes_image",
    "make_subset",
    "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "AugmentationPreset", "Compose", "Normalize",
    "RandomHorizontalFlip", "RandomResize", "RandomSelect", "RandomSizeCrop", "Resize",
    "make_transforms", "resize_size",
]
