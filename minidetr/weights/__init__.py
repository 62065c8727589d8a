"""Files of weights: minidetr's own checkpoints, PyTorch and safetensors files, and what
they hold -- all read without PyTorch (docs/pretrained.md).

======================  =============================================================
:mod:`.checkpoint`      the ``.npz`` checkpoint format (weights, optimiser, schedule,
                        progress, RNG states, configurations; no pickle), atomic saving,
                        and the check that a state dict fits a model
:mod:`.pth`             ``.pth`` files (zip and legacy ``torch.save`` formats) through a
                        restricted unpickler that runs no code from the file
:mod:`.safetensors_io`  ``.safetensors`` files (bfloat16 included)
:mod:`.errors`          the error every file reader raises
:mod:`.sources`         any file or folder -> its state dict and what came with it
                        (an official checkpoint's ``args``, a hub ``config.json``)
:mod:`.layouts`         official / transformers (hub and 5) / torchvision-timm ResNet
                        names -> the official names (= minidetr's)
:mod:`.convert`         the model a file belongs to, shared-head aliases, the checks:
                        a :class:`Checkpoint` of any file (``convert-checkpoint``)
:mod:`.pretrained`      ``train --backbone-weights`` (ImageNet ResNet) and
                        ``train --init-from`` (fine-tuning, class heads re-initialised)
:mod:`.reference_outputs`  the published outputs of the released checkpoints on one
                        COCO image, and the comparison with a converted checkpoint
======================  =============================================================
"""
from .checkpoint import (FORMAT, Checkpoint, CheckpointError, check_model_state,  # noqa: F401
                         load_checkpoint, load_model_state, save_checkpoint)
from .errors import WeightsFileError  # noqa: F401
from .pth import PthError, UnsafePickleError, load_pth  # noqa: F401
from .safetensors_io import SafetensorsError, load_safetensors, safetensors_metadata  # noqa: F401
