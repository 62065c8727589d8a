"""Benchmarks: ``python -m minidetr bench msda|train|launches|profile|conv``.

================  =====================================================================
:mod:`.common`    shapes and inputs, timers, memory meters, machine info (shared)
:mod:`.msda`      the deformable-attention op per backend, forward and backward
:mod:`.msda_gpu`  its GPU columns: the memory-roofline floor, achieved bandwidth, and
                  PyTorch's ``grid_sample`` on the same inputs (when installed)
:mod:`.train`     whole training iterations: time, images/s, peak memory
:mod:`.train_hf`  the same iteration of transformers' Deformable DETR (when installed)
:mod:`.launches`  GPU kernel launches of one training step, counted on the CPU
:mod:`.profile`   where a CPU training step's time goes: ms, %, Function calls and
                  temporary bytes per component, forward and backward
:mod:`.conv`      a ResNet's 3x3 stride-1 convolutions, im2col against Winograd
================  =====================================================================

Speed is measured here, never by timed tests; the numbers go into the docs.
"""
