"""Files of weights: minidetr's own checkpoints, and the official ones.

======================  =============================================================
:mod:`.checkpoint`      the ``.npz`` checkpoint format (weights, optimiser, schedule,
                        progress, RNG states, configurations; no pickle), atomic saving,
                        and the check that a state dict fits a model
:mod:`.official`        official Deformable DETR checkpoints: reading a ``.pth``,
                        converting its state dict (keys and shapes checked)
:mod:`.reference_outputs`  the published outputs of the released checkpoints on one
                        COCO image, and the comparison with a converted checkpoint
======================  =============================================================
"""
from .checkpoint import (FORMAT, Checkpoint, CheckpointError, check_model_state,  # noqa: F401
                         load_checkpoint, load_model_state, save_checkpoint)
