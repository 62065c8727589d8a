"""Device names are read in one place (backend.parse_device / resolve_device), and the two
seams for stand-ins (substitute_cupy, msda.substitute_backend) undo themselves."""
from __future__ import annotations

import numpy as np
import pytest

from minidetr import backend
from minidetr.autograd import Tensor
from minidetr.backend import DeviceError, parse_device, resolve_device
from minidetr.nn import Linear
from minidetr.ops import msda


@pytest.mark.parametrize("name, canonical", [("cpu", "cpu"), ("CPU", "cpu"), ("cuda", "cuda"),
                                             ("gpu", "cuda"), ("cuda:1", "cuda:1")])
def test_parse_device_names(name, canonical):
    assert parse_device(name) == canonical


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "", "cuda:"])
def test_unknown_device_names_are_one_error_everywhere(name):
    for call in (lambda: parse_device(name), lambda: resolve_device(name),
                 lambda: Tensor(np.zeros(2)).to(name), lambda: Linear(2, 2).to(name),
                 lambda: backend.to_device(np.zeros(2), name)):
        with pytest.raises(DeviceError, match="unknown device"):
            call()


def test_resolve_device_without_a_gpu():
    if backend.cupy_available():
        pytest.skip("a GPU is present: auto means cuda here")
    assert resolve_device("auto") == resolve_device(None) == "cpu"
    with pytest.raises(DeviceError, match="--device cuda: the GPU backend is not available"):
        resolve_device("cuda")


def test_with_a_stand_in_for_cupy_auto_means_cuda():
    from minidetr.testing import fakecupy

    with fakecupy.installed() as cp:
        assert backend._import_cupy() is cp
        assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
        assert msda.resolve_backend(None, cp.zeros(3)) == "cupy"
    assert backend._import_cupy() is backend._import_real_cupy()


def test_substitute_backend_swaps_a_backend_for_a_block_and_restores_it():
    class StandIn:
        @staticmethod
        def is_available():
            return False, "a stand-in that is never available"

    before = msda.backend_status("numba")
    with msda.substitute_backend("numba", StandIn):
        assert msda.backend_status("numba") == (False, "a stand-in that is never available")
        with pytest.raises(RuntimeError, match="already substituted"):
            with msda.substitute_backend("numba", StandIn):
                pass
    assert msda.backend_status("numba") == before
    with pytest.raises(ValueError, match="unknown MSDA backend"):
        with msda.substitute_backend("fortran", StandIn):
            pass


def test_backend_device_names_where_the_arrays_live():
    assert [msda.backend_device(n) for n in ("numpy", "numba", "cupy", "numba-cuda")] == \
        ["cpu", "cpu", "cuda", "cuda"]
