"""Testing tools, for minidetr's own tests and for anyone who changes or extends it.

==========================  ==============================================================
:mod:`.gradcheck`           float64 central-difference gradient checks of Functions
                            (:func:`gradcheck`) and modules (:func:`gradcheck_module`),
                            and :func:`assert_allclose`, which names the element that
                            differs
:mod:`.fakecupy`            a NumPy-backed stand-in for CuPy that makes the GPU code path
                            run, and fail as it would on a GPU, on a machine without one
:mod:`.elementwise_harness` runs the CUDA C body of a CuPy ``ElementwiseKernel`` on the CPU
                            (compiled with g++), for fakecupy and the fused-AdamW tests
==========================  ==============================================================

``from minidetr.testing import gradcheck`` is the usual entry point; the other two are
imported by name (``from minidetr.testing import fakecupy``).
"""
from .gradcheck import (GradcheckError, GradcheckResult, ModuleGradcheckResult,  # noqa: F401
                        assert_allclose, gradcheck, gradcheck_module)
