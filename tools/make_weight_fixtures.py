"""Write the small weight files that tests/weights read without torch (needs torch).

    python tools/make_weight_fixtures.py [--out tests/weights/fixtures]

torch is never a dependency of minidetr: run this in a separate environment with torch,
numpy and safetensors installed (minidetr itself is imported from this checkout). It writes:

* ``official-{plain,refine,two-stage}-{zip,legacy}.pth``: Deformable DETR checkpoints laid
  out exactly as the official ``main.py`` saves them -- ``{'model', 'optimizer',
  'lr_scheduler', 'epoch', 'args'}`` with ``args`` an ``argparse.Namespace`` of the official
  argument names -- for minidetr's model at a micro size (:data:`MICRO`; its state-dict keys
  are the official keys). Aliased heads share one storage, as in the official modules; the
  optimizer is a real ``AdamW`` (the official three parameter groups) after one step, in
  which only some parameters had a gradient (the others have no state, as in torch).
  ``zip`` is torch's default format, ``legacy`` is ``_use_new_zipfile_serialization=False``.
* ``edge-cases-{zip,legacy}.pth``: every dtype NumPy has, 0-d and empty tensors, a
  transpose, a slice with a storage offset, views sharing one storage, an expanded tensor,
  an ``nn.Parameter``, nested containers, strings, numbers, bytes, None.
* ``edge-cases.safetensors``: the dtypes of safetensors (bfloat16 included), 0-d and empty.
* ``expected.json``: for each object (both ``.pth`` formats of it) and the safetensors
  file, what ``torch.load(weights_only=True)`` (or ``safetensors.torch.load_file``) gives,
  described by :func:`describe` (dtype, shape and SHA-256 -- its first 80 bits -- of every
  array's bytes; every other value exactly). The tests compare minidetr's readers with it,
  bit for bit.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "weights" / "fixtures"
VARIANTS = ("plain", "refine", "two-stage")
FORMATS = {"zip": True, "legacy": False}          # -> _use_new_zipfile_serialization
#: The micro model of the fixtures (minidetr's TinyBackbone; ~15-19 k weights).
MICRO = dict(tiny_channels=(8, 8, 16, 16), d_model=16, nheads=2, enc_layers=1, dec_layers=2,
             dim_feedforward=16, num_queries=6, n_points=2, gn_groups=4, num_classes=5)


# --------------------------------------------------------------------------- description
def describe(obj):
    """A JSON-able description of a loaded object (NumPy side): arrays by dtype, shape
    and the SHA-256 of their bytes; containers with their type and order; other values
    exactly. Two objects are equal, bit for bit, when their descriptions are."""
    if isinstance(obj, np.ndarray):
        data = obj.tobytes(order="C")                     # (0-d arrays stay 0-d)
        return {"array": [obj.dtype.str, list(obj.shape),
                          hashlib.sha256(data).hexdigest()[:20]]}
    if isinstance(obj, np.generic):
        return {"scalar": [obj.dtype.str, obj.tobytes().hex()]}
    if isinstance(obj, np.dtype):
        return {"dtype": obj.str}
    if isinstance(obj, dict):
        return {type(obj).__name__: [[describe(k), describe(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [describe(v) for v in obj]}
    if isinstance(obj, (set, frozenset)):
        return {type(obj).__name__: sorted(json.dumps(describe(v)) for v in obj)}
    if isinstance(obj, bool) or obj is None:
        return {"const": obj}
    if isinstance(obj, int):
        return {"int": str(obj)}
    if isinstance(obj, (float, complex)):
        return {type(obj).__name__: repr(obj)}
    if isinstance(obj, str):
        return {"str": obj}
    if isinstance(obj, (bytes, bytearray)):
        return {type(obj).__name__: obj.hex()}
    raise TypeError(f"describe: no description for {type(obj).__name__}")


def torch_to_numpy(obj, memo=None):
    """What minidetr's reader is meant to give for an object ``torch.load`` gave: tensors
    -> NumPy arrays (bfloat16 -> float32, exactly), ``argparse.Namespace`` -> dict,
    ``torch.Size`` -> tuple, ``torch.device`` -> str, torch dtypes -> NumPy dtypes."""
    import torch

    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        out = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    elif isinstance(obj, argparse.Namespace):
        out = {k: torch_to_numpy(v, memo) for k, v in vars(obj).items()}
    elif isinstance(obj, torch.Size):
        out = tuple(obj)
    elif isinstance(obj, torch.device):
        out = str(obj)
    elif isinstance(obj, torch.dtype):
        out = "bfloat16" if obj == torch.bfloat16 else np.dtype(
            torch.empty(0, dtype=obj).numpy().dtype)
    elif isinstance(obj, dict):
        out = type(obj)() if type(obj) is collections.OrderedDict else {}
        for k, v in obj.items():
            out[torch_to_numpy(k, memo)] = torch_to_numpy(v, memo)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        out = type(obj)(torch_to_numpy(v, memo) for v in obj)
    else:
        out = obj
    memo[id(obj)] = out
    return out


# --------------------------------------------------------------------------- official layout
def official_args(variant, cfg):
    """The ``args`` of the official ``main.py`` (its argument names), with the micro values,
    plus minidetr's extensions ``tiny_channels``, ``gn_groups`` and ``num_classes``."""
    return argparse.Namespace(
        lr=2e-4, lr_backbone_names=["backbone.0"], lr_backbone=2e-5,
        lr_linear_proj_names=["reference_points", "sampling_offsets"], lr_linear_proj_mult=0.1,
        batch_size=2, weight_decay=1e-4, epochs=50, lr_drop=40, lr_drop_epochs=None,
        clip_max_norm=0.1, sgd=False, with_box_refine=variant != "plain",
        two_stage=variant == "two-stage", frozen_weights=None, backbone="tiny",
        dilation=False, position_embedding="sine", position_embedding_scale=2 * math.pi,
        num_feature_levels=cfg.num_feature_levels, enc_layers=cfg.enc_layers,
        dec_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        hidden_dim=cfg.d_model, dropout=cfg.dropout, nheads=cfg.nheads,
        num_queries=cfg.num_queries, dec_n_points=cfg.n_points, enc_n_points=cfg.n_points,
        masks=False, aux_loss=True, set_cost_class=2, set_cost_bbox=5, set_cost_giou=2,
        mask_loss_coef=1, dice_loss_coef=1, cls_loss_coef=2, bbox_loss_coef=5,
        giou_loss_coef=2, focal_alpha=0.25, dataset_file="coco", coco_path="./data/coco",
        coco_panoptic_path=None, remove_difficult=False,
        output_dir=f"exps/micro_deformable_detr_{variant}", device="cuda", seed=42,
        resume="", start_epoch=0, eval=False, num_workers=2, cache_mode=False,
        world_size=1, dist_url="env://", distributed=False,
        tiny_channels=list(cfg.tiny_channels), gn_groups=cfg.gn_groups,
        num_classes=cfg.num_classes)


def alias_of(key, variant):
    """The key whose tensor ``key`` shares in the official model (or ``key`` itself):
    heads shared by all decoder layers (plain), the decoder's references to the heads."""
    key = re.sub(r"^transformer\.decoder\.(class_embed|bbox_embed)\.", r"\1.", key)
    if variant == "plain":
        key = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.0.", key)
    return key


def official_checkpoint(variant, seed):
    """``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'}`` of the micro model."""
    import torch

    from minidetr.models import build_model, get_config

    cfg = get_config("tiny", variant, **MICRO)
    state = build_model(cfg).state_dict()
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, value in state.items():
        if alias_of(key, variant) in tensors:                     # one tensor, two names
            continue
        noise = rng.normal(0.0, 0.05, value.shape).astype(value.dtype)
        tensors[key] = torch.nn.Parameter(torch.from_numpy(value + noise))
    model = collections.OrderedDict((k, tensors[alias_of(k, variant)].data) for k in state)

    def has(name, words):
        return any(w in name for w in words)

    args = official_args(variant, cfg)
    named = list(tensors.items())
    groups = [
        {"params": [p for n, p in named if not has(n, args.lr_backbone_names)
                    and not has(n, args.lr_linear_proj_names)], "lr": args.lr},
        {"params": [p for n, p in named if has(n, args.lr_backbone_names)],
         "lr": args.lr_backbone},
        {"params": [p for n, p in named if has(n, args.lr_linear_proj_names)],
         "lr": args.lr * args.lr_linear_proj_mult},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    # One step in which only the heads and the level embedding get a gradient.
    loss = sum((p ** 2).sum() for n, p in named if has(n, ("class_embed", "level_embed")))
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {"model": model, "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 0, "args": args}


# --------------------------------------------------------------------------- edge cases
def edge_cases(seed):
    """A nest of everything a reader must get right (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.randn(24, generator=g)                 # one storage, several views
    matrix = torch.randn(3, 5, generator=g, dtype=torch.float64)
    special = [0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 1e-40, 3e38]
    return collections.OrderedDict(
        float16=torch.tensor(special[:7] + [6e-8, 65504.0], dtype=torch.float16),
        bfloat16=torch.tensor(special, dtype=torch.bfloat16),
        float32=torch.tensor(special, dtype=torch.float32),
        float64=matrix,
        int64=torch.tensor([-2 ** 63, -1, 0, 1, 2 ** 63 - 1], dtype=torch.int64),
        int32=torch.tensor([-2 ** 31, 7, 2 ** 31 - 1], dtype=torch.int32),
        int16=torch.tensor([-2 ** 15, 2 ** 15 - 1], dtype=torch.int16),
        int8=torch.tensor([-128, 127], dtype=torch.int8),
        uint8=torch.tensor([0, 1, 255], dtype=torch.uint8),
        bool=torch.tensor([[True, False], [False, True]]),
        complex64=torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
        scalar=torch.tensor(3.25),
        int_scalar=torch.tensor(-7, dtype=torch.int64),
        empty=torch.zeros(0, 3),
        empty_int=torch.zeros(2, 0, dtype=torch.int64),
        transposed=matrix.t(),                                  # strides (1, 5)
        sliced=base[5:11],                                      # storage offset 5
        shared_row=base.view(4, 6)[1],                          # offset 6, same storage
        shared_column=base.view(6, 4)[:, 2],                    # offset 2, stride 4
        whole=base,
        expanded=torch.arange(3.0).view(3, 1).expand(3, 4),     # stride (1, 0)
        parameter=torch.nn.Parameter(torch.randn(2, 3, generator=g)),
        nested={"list": [1, 2.5, "three", None, True, (4, base[:2])],
                "tuple": (torch.ones(2, dtype=torch.int32), "x"),
                "ordered": collections.OrderedDict(b=1, a=2), "int_keys": {0: "zero", 1: -1},
                "empty": {}, "set": {3, 1, 2}},
        text="héllo ✓", big_int=12345678901234567890123, small_float=0.1,
        complex_number=1 - 2j, none=None, raw_bytes=b"\x00\xff\x80",
        size=torch.Size([2, 3]), device=torch.device("cuda", 1), dtype=torch.float16,
    )


def safetensors_cases(seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "bfloat16": torch.tensor([0.0, -0.0, 1.5, -2.25, 3e38, 1e-40, float("inf"),
                                  float("nan")], dtype=torch.bfloat16),
        "bfloat16_matrix": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "float16": torch.randn(2, 3, generator=g).half(),
        "float32": torch.randn(4, 2, 3, generator=g),
        "float64": torch.randn(5, generator=g, dtype=torch.float64),
        "int64": torch.tensor([-2 ** 63, 0, 2 ** 63 - 1]),
        "int32": torch.tensor([-5, 5], dtype=torch.int32),
        "int16": torch.tensor([-3, 3], dtype=torch.int16),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


# --------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import safetensors.torch
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    expected = {}

    def save(stem, obj):
        """Both formats of one object; torch.load must give the same from each."""
        for fmt, zip_format in FORMATS.items():
            path = out / f"{stem}-{fmt}.pth"
            torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
            with torch.serialization.safe_globals([argparse.Namespace]):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            description = describe(torch_to_numpy(loaded))
            if expected.setdefault(stem, description) != description:
                raise RuntimeError(f"torch.load reads {path.name} differently from the other "
                                   "format")
            print(f"{path.name}: {path.stat().st_size} bytes")

    for i, variant in enumerate(VARIANTS):
        save(f"official-{variant}", official_checkpoint(variant, seed=i))
    save("edge-cases", edge_cases(seed=10))
    path = out / "edge-cases.safetensors"
    safetensors.torch.save_file(safetensors_cases(seed=11), path,
                                metadata={"format": "pt", "made_by": "make_weight_fixtures"})
    path.chmod(0o644)
    loaded = collections.OrderedDict(safetensors.torch.load_file(path))   # in file order
    expected[path.name] = describe(torch_to_numpy(loaded))
    print(f"{path.name}: {path.stat().st_size} bytes")
    lines = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
             for k, v in sorted(expected.items())]
    (out / "expected.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {len(expected)} files and expected.json to {out} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
