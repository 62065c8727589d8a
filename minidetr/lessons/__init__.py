"""What the notebooks use beyond the library itself.

==================  ===================================================================
:mod:`.notebooks`   building and checking the notebooks (``python -m
                    minidetr.lessons.notebooks build|check|images``), the bundled
                    example pictures, the tiny/full setting switch
:mod:`.viz`         drawings of the deformable-attention op: sampling points per head and
                    level, bilinear corners, feature maps
:mod:`.viz_model`   drawings of a model's inside: reference points, boxes layer by layer,
                    attention over levels, proposals
:mod:`.examples`    two small training loops (an MLP, a tiny CNN) that show autograd,
                    layers and AdamW learning in seconds
:mod:`.experiments` the experiments of notebooks 14-16 (convergence, ablations): one
                    training budget, the settings, running them, caching the results
:mod:`.trained`     opening a trained model: cached checkpoints, held-out images, what
                    its attention samples, per-layer IoU of the decoder's boxes
==================  ===================================================================

The run pictures of training (loss and AP curves, detections) are a different job: they
live in :mod:`minidetr.training.plots`.
"""
