"""The device -> host transfer guard (minidetr.backend.transfer_guard) and what the GPU
training step may copy.

On the CPU the guard's machinery is tested on a stand-in device array class whose
conversions all go through ``get()``, like ``cupy.ndarray``'s; the real guard is a no-op
for NumPy arrays. On minidetr.testing.fakecupy (everywhere) and with a GPU, one training step of
the tiny model runs under the real guard: it must copy nothing but the matcher's cost
matrices and the logged values, and the memory pool must not grow from step to step.
"""
from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from minidetr.backend import (TRANSFER_METHODS, HostTransferError, allow_transfers,
                              guard_array_type, is_out_of_memory, transfer_guard)


class FakeDeviceArray:
    """Stands in for ``cupy.ndarray``: every conversion reads the data through ``get()``."""

    def __init__(self, values):
        self._device = np.asarray(values, dtype=np.float32)

    shape = property(lambda self: self._device.shape)
    dtype = property(lambda self: self._device.dtype)

    def get(self):
        return self._device.copy()

    def item(self):
        return self.get().item()

    def tolist(self):
        return self.get().tolist()

    def __float__(self):
        return float(self.get()[0])

    def __bool__(self):
        return bool(self.get()[0])

    def __repr__(self):
        return f"FakeDeviceArray({self.get().tolist()})"


CONVERSIONS = {
    "get": lambda x: x.get(),
    "item": lambda x: x.item(),
    "tolist": lambda x: x.tolist(),
    "__float__": lambda x: float(x),
    "__bool__": lambda x: 1 if x else 0,
    "__repr__": lambda x: repr(x),
    "__str__": lambda x: str(x),
    "__format__": lambda x: f"{x}",
}


# --------------------------------------------------------------------------- the mechanism
@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_every_conversion_to_the_host_raises_and_names_itself(name):
    x = FakeDeviceArray([2.5])
    with guard_array_type(FakeDeviceArray):
        with pytest.raises(HostTransferError, match=r"FakeDeviceArray\.(\w+)\(\) of an array "
                                                    r"of shape \(1,\) and dtype float32"):
            CONVERSIONS[name](x)
    assert float(x) == 2.5                               # usable again after the guard


def test_the_error_names_the_conversion_that_was_called():
    x = FakeDeviceArray([1.0])
    with guard_array_type(FakeDeviceArray), pytest.raises(HostTransferError) as err:
        float(x)
    assert "FakeDeviceArray.__float__()" in str(err.value)
    assert "allow_transfers" in str(err.value)           # says how to permit a copy


def test_allow_transfers_permits_a_block_and_logs_each_copy_once():
    x = FakeDeviceArray([3.0])
    with guard_array_type(FakeDeviceArray) as log:
        with allow_transfers("the matcher's cost matrices"):
            assert float(x) == 3.0                       # __float__ calls get(): one copy
            assert x.get().tolist() == [3.0]
        with allow_transfers("outer"), allow_transfers("inner"):
            assert x.item() == 3.0                       # the innermost reason is logged
        with pytest.raises(HostTransferError):
            x.item()                                     # outside the blocks again
    assert log == Counter({"the matcher's cost matrices": 2, "inner": 1})


def test_allow_names_some_conversions_everywhere():
    x = FakeDeviceArray([1.5])
    with guard_array_type(FakeDeviceArray, allow=("__repr__",)) as log:
        assert repr(x) == "FakeDeviceArray([1.5])"      # repr calls get() inside: allowed
        with pytest.raises(HostTransferError, match=r"\.get\(\)"):
            x.get()
    assert sum(log.values()) == 1


def test_the_class_is_exactly_restored_even_after_an_error():
    before = dict(vars(FakeDeviceArray))
    with pytest.raises(HostTransferError):
        with guard_array_type(FakeDeviceArray):
            assert "__str__" in vars(FakeDeviceArray)    # inherited from object: covered
            float(FakeDeviceArray([1.0]))
    assert dict(vars(FakeDeviceArray)) == before         # own methods back, nothing added
    assert "__index__" not in vars(FakeDeviceArray)      # a name the class lacks: never added


def test_guards_do_not_nest_and_bad_allow_names_are_refused():
    with guard_array_type(FakeDeviceArray):
        with pytest.raises(RuntimeError, match="already active"):
            with guard_array_type(FakeDeviceArray):
                pass
    with pytest.raises(ValueError, match="allow"):
        with transfer_guard(allow=("get", "__len__")):
            pass
    with pytest.raises(ValueError, match="allow"):
        with transfer_guard(allow="get"):                # a string, not a collection
            pass


def test_a_compiled_class_is_refused_with_a_clear_error_and_left_unchanged():
    with pytest.raises(RuntimeError, match="CuPy 13 or newer"):
        with guard_array_type(int):                      # immutable: int.__float__ is fixed
            pass
    assert float(3) == 3.0
    with guard_array_type(FakeDeviceArray):              # the lock was released
        pass


def test_an_allowance_covers_its_own_thread_only():
    x, seen = FakeDeviceArray([1.0]), []

    def other_thread():
        try:
            float(x)
        except HostTransferError:
            seen.append("refused")

    with guard_array_type(FakeDeviceArray), allow_transfers("main thread"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert float(x) == 1.0
    assert seen == ["refused"]


def test_transfer_methods_cover_the_conversions_of_cupy_arrays():
    assert {"get", "item", "tolist", "__float__", "__int__", "__bool__",
            "__index__"} <= set(TRANSFER_METHODS)


# --------------------------------------------------------------------------- NumPy: no-op
def test_the_guard_lets_numpy_arrays_convert_freely():
    a = np.arange(3.0, dtype=np.float32)
    with transfer_guard() as log:
        assert float(a[1]) == 1.0 and int(a[2]) == 2 and bool(a[0]) is False
        assert a.tolist() == [0.0, 1.0, 2.0] and np.asarray(a).item(0) == 0.0
        with allow_transfers("unused"):
            pass
    assert log == Counter()                              # NumPy arrays never pass it


# --------------------------------------------------------------------------- out of memory
def test_out_of_memory_errors_are_recognised():
    class OutOfMemoryError(MemoryError):                 # like cupy.cuda.memory's
        pass

    class CUBLASError(RuntimeError):
        pass

    CUBLASError.__module__ = "cupy_backends.cuda.libs.cublas"
    assert is_out_of_memory(MemoryError("Unable to allocate 2.00 GiB"))   # NumPy
    assert is_out_of_memory(OutOfMemoryError("Out of memory allocating 1,024 bytes"))
    assert is_out_of_memory(CUBLASError("CUBLAS_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(CUBLASError("CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not is_out_of_memory(RuntimeError("out of memory"))   # not from CuPy: unknown
    assert not is_out_of_memory(ValueError("shapes do not match"))


# --------------------------------------------------------------------------- on a GPU
def _gpu_setup(variant="plain"):
    from minidetr.bench.common import synthetic_batch
    from minidetr.models.build import build_criterion, build_model
    from minidetr.models.config import get_config
    from minidetr.optim import AdamW
    from minidetr.training import TrainConfig
    from minidetr.training.engine import build_param_groups

    cfg = get_config("tiny", variant)
    model = build_model(cfg).to("cuda")
    optimizer = AdamW(build_param_groups(model, TrainConfig()), lr=1e-4, weight_decay=1e-4)
    batch = synthetic_batch(2, 96, 128, cfg.num_classes, np.random.default_rng(0))
    return cfg, model, build_criterion(cfg), optimizer, batch


@pytest.mark.parametrize("variant", ["plain", "two-stage"])
def test_a_gpu_training_step_copies_only_the_cost_matrices_and_the_logged_values(
        device_cupy, variant):
    from minidetr.training.engine import train_step

    cfg, model, criterion, optimizer, batch = _gpu_setup(variant)
    train_step(model, criterion, optimizer, batch, device="cuda")   # compile kernels first
    with transfer_guard() as log:
        values = train_step(model, criterion, optimizer, batch, device="cuda")
    prediction_sets = cfg.dec_layers + (1 if cfg.two_stage else 0)   # final, aux, encoder
    assert log == Counter({"the matcher's cost matrices": prediction_sets,
                           "the step's logged values": 1}), log
    assert all(np.isfinite(v) for v in values.values()), values


def test_the_gpu_memory_pool_does_not_grow_from_step_to_step(device_cupy):
    from minidetr.training.engine import train_step

    _, model, criterion, optimizer, batch = _gpu_setup()
    pool, in_use = device_cupy.get_default_memory_pool(), []
    for _ in range(5):
        train_step(model, criterion, optimizer, batch, device="cuda")
        in_use.append(pool.used_bytes())
    # step 1 creates the AdamW moments; from step 2 on the bytes in use stay put
    assert in_use[1:] == [in_use[1]] * 4, f"bytes in use after each step: {in_use}"
