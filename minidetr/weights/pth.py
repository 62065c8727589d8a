"""Reading PyTorch ``.pth`` files without PyTorch, and without running any of their code.

Why plain unpickling is dangerous
---------------------------------
A ``.pth`` file is a Python *pickle*: a small program for a stack machine that rebuilds
objects. Two of its instructions are "push the global ``module.name``" (``GLOBAL``,
``STACK_GLOBAL``, ``INST``, ``OBJ``, ``EXT*``) and "call what is on the stack" (``REDUCE``,
``NEWOBJ``, ``BUILD``'s ``__setstate__``). Python's ``pickle.load`` obeys them, so a file
whose pickle names ``os.system`` -- which is all a class whose ``__reduce__`` returns
``(os.system, ("rm -rf ~",))`` writes -- runs that command while it is being loaded.
Loading an untrusted ``.pth`` with plain ``pickle`` (or ``torch.load(weights_only=False)``)
is running an untrusted program.

What this reader allows
-----------------------
Every callable a pickle can reach comes from the unpickler's ``find_class``. Here it knows
the short list below and returns minidetr's own stand-ins, never the real object; any
other global is refused with :class:`UnsafePickleError`, which names it, *before* anything
is called:

=============================================  ===========================================
global in the file                             what this reader makes of it
=============================================  ===========================================
``torch._utils._rebuild_tensor`` / ``_v2``     a NumPy array (storage, offset, size,
/ ``_v3``                                      stride; v3 also names the dtype)
``torch._utils._rebuild_parameter``            the array of the parameter
(``_with_state``)
``torch._tensor._rebuild_from_type_v2``        the array (for ``torch.Tensor`` and
(``_rebuild_from_type``)                       ``torch.nn.parameter.Parameter`` only)
``torch.FloatStorage`` ... (12 typed           the element type of a storage
storages), ``torch.storage.UntypedStorage``
``torch.float32`` ... (torch dtypes)           a NumPy dtype (``"bfloat16"`` for bfloat16)
``torch.Size``, ``torch.device``               a tuple, a string such as ``"cuda:0"``
``collections.OrderedDict``                    ``OrderedDict``
``argparse.Namespace``                         a plain ``dict`` of its attributes
``builtins.set``/``frozenset``/``complex``/    that builtin (data only)
``bytearray``
``_codecs.encode`` (latin-1 only)              ``bytes`` (how protocol 2 stores bytes)
``numpy.dtype`` (numbers only),                a NumPy dtype, a NumPy scalar
``numpy.core.multiarray.scalar``
=============================================  ===========================================

The stand-ins also refuse ``BUILD`` (``__setstate__``), so a pickle cannot change them.
Sparse, quantized and other special tensors, and dtypes NumPy does not have (float8),
give a :class:`PthError` that says so. Storage locations (``"cuda:0"``) are ignored: every
array is read to the CPU, as ``torch.load(map_location="cpu")`` does.

What comes back
---------------
The saved object, with every tensor a NumPy array of the same dtype, shape and bits
(bfloat16 becomes float32, which holds every bfloat16 value exactly). As with
``torch.load``, tensors that shared one storage in the file share memory: a contiguous
tensor is a view of its storage (no copy); a strided one (a transpose, an expanded
tensor) is copied once. ``argparse.Namespace`` becomes a dict; ``OrderedDict`` stays one.

The two layouts ``torch.save`` writes
-------------------------------------
* **zip** (torch >= 1.6, the default): a zip archive holding ``<name>/data.pkl`` (the
  pickle), ``<name>/data/<key>`` (each storage's raw little-endian bytes, stored
  uncompressed), ``<name>/byteorder``, ``<name>/version``. The pickle refers to a storage
  by the *persistent id* ``("storage", storage_type, key, location, numel)``. The zip's
  CRC-32 of every member is checked, so a flipped byte is detected.
* **legacy** (torch < 1.6, or ``_use_new_zipfile_serialization=False``; the 2020
  Deformable DETR releases may be in it): five pickles in a row -- a magic number, the
  protocol version (1001), the system info (byte order, type sizes), the object (with
  persistent ids ``("storage", storage_type, key, location, numel, view_metadata)``) and
  the sorted list of storage keys -- then, for each key in that order, an int64 element
  count and the storage's raw bytes. The storages follow the object, so the object's
  pickle is run twice: once to learn each storage's dtype (and where the pickle ends),
  then, once the storages are read, to build the arrays.

Shapes: a tensor of ``size`` (d0, ..., dk) with ``stride`` (s0, ..., sk) and storage
offset ``o`` reads element ``(i0, ..., ik)`` from storage element ``o + sum_j i_j s_j``.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from math import prod
from pathlib import Path

import numpy as np

from .errors import WeightsFileError

BFLOAT16 = "bfloat16"      # NumPy has no bfloat16: storages of it are read as float32

# torch's typed storage classes -> element dtypes (all little-endian in the file).
STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "BFloat16Storage": BFLOAT16, "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
    "ComplexDoubleStorage": "<c16", "ComplexFloatStorage": "<c8",
}
# torch dtypes by the names they are pickled under (``torch.float32`` -> "torch float32").
TORCH_DTYPES = {
    "float64": "<f8", "double": "<f8", "float32": "<f4", "float": "<f4", "float16": "<f2",
    "half": "<f2", "bfloat16": BFLOAT16, "int64": "<i8", "long": "<i8", "int32": "<i4",
    "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?", "complex128": "<c16",
    "cdouble": "<c16", "complex64": "<c8", "cfloat": "<c8",
}
# torch dtypes and storages that exist but have no NumPy equivalent (a clear PthError).
_NO_NUMPY_DTYPE = re.compile(r"^(float8_e\w+|float4_e\w+|complex32|chalf|bits(8|16|\dx\d)"
                             r"|u?int[1-7]|q(u?int8|int32|uint4x2|uint2x4)"
                             r"|Q(U?Int8|Int32|UInt4x2|UInt2x4)Storage)$")
# torch rebuild functions of tensors this reader does not support (a clear PthError).
_UNSUPPORTED_TENSORS = {
    "_rebuild_sparse_tensor": "a sparse tensor", "_rebuild_sparse_csr_tensor":
    "a sparse tensor", "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (no data)",
    "_rebuild_wrapper_subclass": "a tensor subclass", "_rebuild_nested_tensor":
    "a nested tensor", "_rebuild_device_tensor_from_numpy": "a device tensor",
    "_rebuild_xla_tensor": "an XLA tensor", "_rebuild_mtia_tensor": "an MTIA tensor",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# An overlapping view (an expanded tensor) is materialised; beyond this it is refused.
_MAX_EXPANDED_BYTES = 1 << 30


class PthError(WeightsFileError):
    """A ``.pth`` file cannot be read: missing, truncated, corrupt, or not a PyTorch file."""


class UnsafePickleError(PthError):
    """The file's pickle asks for a global this reader does not allow (nothing was run)."""


def _itemsize(dtype) -> int:
    return 2 if dtype == BFLOAT16 else np.dtype(dtype).itemsize


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (as their uint16 bits) -> float32, exactly: they are the top half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- stand-ins
class _Stub:
    """Base of every non-data object the unpickler hands out: BUILD on it is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle tries to set the state of {self!r} "
                                "(BUILD); a weights file never does that. Nothing was run.")


class _Callable(_Stub):
    """An allowed global: calling it runs minidetr's stand-in function ``fn``."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.name


class _StorageType(_Stub):
    """A storage class (``torch.FloatStorage``): its element dtype (None: not in NumPy)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _TorchDtype(_StorageType):
    """A torch dtype (``torch.float32``)."""

    __slots__ = ()


class _TensorType(_Stub):
    """``torch.Tensor`` / ``torch.nn.Parameter``, as ``_rebuild_from_type_v2`` names them."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


class _Storage(_Stub):
    """A storage the pickle refers to: dtype, element count and (once read) its elements.

    ``data`` is a 1-D array of ``numel`` elements (float32 for bfloat16; raw bytes, uint8,
    for an untyped storage), or None while the storage is not read yet.
    """

    __slots__ = ("dtype", "key", "numel", "data", "_as")

    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel, self.data, self._as = dtype, key, numel, None, {}

    def __repr__(self):
        return f"storage {self.key!r}"

    def elements(self, dtype):
        """The elements as ``dtype`` (a v3 tensor names its dtype; its storage is bytes)."""
        if dtype is None or dtype == self.dtype:
            return self.data
        if self.dtype != "u1":
            raise PthError(f"storage {self.key!r} of {self.dtype} is read as {dtype}")
        if dtype not in self._as:
            if len(self.data) % _itemsize(dtype):
                raise PthError(f"storage {self.key!r}: {len(self.data)} bytes is no whole "
                               f"number of {dtype} values")
            self._as[dtype] = (_bfloat16_to_float32(self.data.view("<u2")) if dtype == BFLOAT16
                               else self.data.view(dtype))
        return self._as[dtype]


class _Record(dict):
    """An ``argparse.Namespace``: its attributes, as a dict (see :func:`_plain`)."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:     # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise PthError(f"an argparse.Namespace with the state {type(state).__name__}")
        self.update(state)


class _DtypeBox:
    """A ``numpy.dtype`` of the pickle; BUILD may set its byte order only."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


# --------------------------------------------------------------------------- tensors
def _is_contiguous(size, stride) -> bool:
    """Whether (size, stride) is the C-contiguous layout (dims of size 1 may have any)."""
    expected = 1
    for n, s in reversed(list(zip(size, stride))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _ints(values, what, storage):
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) for v in values):
        raise PthError(f"{storage!r}: a tensor {what} of {values!r:.80} (not integers)")
    return tuple(values)


def _array(storage, offset, size, stride, dtype=None):
    """A NumPy array from a storage, as ``torch._utils._rebuild_tensor_v2`` builds a tensor.

    Shapes: storage (numel,) -> array ``size``; a view when (size, stride) is contiguous,
    else one copy. Returns None while the storage is not read yet (the legacy scan pass).
    """
    if not isinstance(storage, _Storage):
        raise PthError(f"a tensor's storage is {storage!r:.80}, not a storage")
    size, stride = _ints(size, "size", storage), _ints(stride, "stride", storage)
    if not isinstance(offset, int) or len(size) != len(stride):
        raise PthError(f"{storage!r}: a tensor of size {size}, stride {stride}, "
                       f"offset {offset!r:.40}")
    if storage.data is None:
        return None
    elements = storage.elements(dtype)
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise PthError(f"{storage!r}: negative size, stride or offset (size {size}, "
                       f"stride {stride}, offset {offset})")
    numel = prod(size)
    if numel == 0:
        return np.empty(size, dtype=elements.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(elements):
        raise PthError(f"{storage!r} holds {len(elements)} elements; a tensor of size {size}, "
                       f"stride {stride}, offset {offset} reads element {last} (the file is "
                       "corrupt)")
    if _is_contiguous(size, stride):
        return elements[offset:offset + numel].reshape(size)      # a view: no copy
    if numel > len(elements) and numel * elements.itemsize > _MAX_EXPANDED_BYTES:
        raise PthError(f"{storage!r}: an expanded tensor of size {size} would take "
                       f"{numel * elements.itemsize} bytes from a storage of "
                       f"{len(elements)} elements")
    view = np.lib.stride_tricks.as_strided(
        elements[offset:], shape=size, strides=tuple(s * elements.itemsize for s in stride))
    return view.copy()                                             # (d0, ..., dk), owns its data


def _tensor_v1(storage, offset, size, stride, *_requires_grad_hooks_metadata):
    return _array(storage, offset, size, stride)


def _tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_metadata):
    if not isinstance(dtype, _TorchDtype):
        raise PthError(f"a tensor's dtype is {dtype!r:.80}, not a torch dtype")
    if dtype.dtype is None:
        raise PthError(f"a tensor of dtype torch.{dtype.name}, which NumPy does not have")
    return _array(storage, offset, size, stride, dtype.dtype)


def _parameter(data, *_requires_grad_hooks_state):
    if data is not None and not isinstance(data, np.ndarray):
        raise PthError(f"a Parameter whose data is {type(data).__name__}, not a tensor")
    return data


_TENSOR_BUILDERS = (_tensor_v1, _tensor_v3, _parameter)


def _from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: a Tensor/Parameter rebuilt by ``func``."""
    if not (isinstance(func, _Callable) and func.fn in _TENSOR_BUILDERS
            and isinstance(new_type, _TensorType) and isinstance(args, tuple)):
        raise PthError(f"_rebuild_from_type_v2 with {func!r:.60}, {new_type!r:.60}: not a "
                       "plain tensor")
    return func(*args)


def _numpy_dtype(name, *_align_copy):
    dtype = np.dtype(str(name))
    if dtype.kind not in "biufc":
        raise UnsafePickleError(f"numpy.dtype({str(name)!r}) is not a number type; only "
                                "number dtypes are allowed")
    return _DtypeBox(dtype)


def _numpy_scalar(dtype, raw=None):
    dtype = dtype.dtype if isinstance(dtype, _DtypeBox) else None
    if dtype is None or not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise PthError("a NumPy scalar with no number dtype or the wrong number of bytes")
    return np.frombuffer(raw, dtype=dtype, count=1)[0]


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode``, as protocol-2 pickles use it for bytes (latin-1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode is allowed for latin-1 text only, got "
                                f"{encoding!r:.40}")
    return text.encode("latin1")


def _torch_device(kind, index=None):
    return str(kind) if index is None else f"{kind}:{index}"


def _torch_size(values=()):
    return tuple(values)


def _data_only(fn):
    """A builtin constructor of plain data (set, complex, ...) that takes plain data."""
    def call(*args):
        if any(isinstance(a, _Stub) for a in args):
            raise PthError(f"{fn.__name__}() of a non-data object")
        return fn(*args)
    return call


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _tensor_v1,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_v1,
    ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("torch._tensor", "_rebuild_from_type"): _from_type,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _torch_device,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{(m, n): _data_only(f) for m in ("builtins", "__builtin__")
       for n, f in (("set", set), ("frozenset", frozenset), ("complex", complex),
                    ("bytearray", bytearray))},
}
_TENSOR_TYPES = {("torch", "Tensor"), ("torch._tensor", "Tensor"),
                 ("torch.nn.parameter", "Parameter"), ("torch.nn", "Parameter")}
_UNTYPED_STORAGES = {("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage"),
                     ("torch.storage", "_UntypedStorage")}

#: Every global the reader accepts, as ``"module.name"`` (for docs and error messages).
ALLOWED_GLOBALS = frozenset(
    [f"{m}.{n}" for m, n in _ALLOWED] + [f"{m}.{n}" for m, n in _TENSOR_TYPES]
    + [f"{m}.{n}" for m, n in _UNTYPED_STORAGES] + ["collections.OrderedDict",
                                                    "argparse.Namespace"]
    + [f"torch.{n}" for n in STORAGE_DTYPES] + [f"torch.{n}" for n in TORCH_DTYPES])


def _find_global(module, name, source):
    """What the global ``module.name`` of a pickle becomes (see the module docstring)."""
    if (module, name) in _ALLOWED:
        return _Callable(f"{module}.{name}", _ALLOWED[(module, name)])
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict     # a builtin type: immutable, makes only data
    if (module, name) == ("argparse", "Namespace"):
        return _Record
    if (module, name) in _TENSOR_TYPES:
        return _TensorType(f"{module}.{name}")
    if (module, name) in _UNTYPED_STORAGES:
        return _StorageType(name, "u1")
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(name, STORAGE_DTYPES[name])
    if module == "torch" and name in TORCH_DTYPES:
        return _TorchDtype(name, TORCH_DTYPES[name])
    if module == "torch" and _NO_NUMPY_DTYPE.match(name):
        return _TorchDtype(name, None) if not name.endswith("Storage") else \
            _StorageType(name, None)
    if module == "torch._utils" and name in _UNSUPPORTED_TENSORS:
        raise PthError(f"{source}: holds {_UNSUPPORTED_TENSORS[name]} "
                       f"(torch._utils.{name}), which this reader does not support; load "
                       "it with torch and save dense tensors")
    what = f"{module}.{name}"[:150]
    raise UnsafePickleError(
        f"{source}: refused the global {what}. A PyTorch weights file needs only tensors, "
        "storages, dicts, lists, numbers and strings; this one asks for something else, and "
        "a pickle that names a global can run it. Nothing was run. If you trust the file, "
        "load it with torch, and save its state_dict again.")


class _Unpickler(pickle.Unpickler):
    """The restricted unpickler: globals from :func:`_find_global`, storages from
    ``storage_of(persistent_id)`` (None: the pickle may not refer to any)."""

    def __init__(self, file, source, storage_of=None):
        super().__init__(file, encoding="utf-8")          # as torch.load
        self._source, self._storage_of = source, storage_of

    def find_class(self, module, name):
        if self._storage_of is None:
            raise UnsafePickleError(f"{self._source}: refused the global "
                                    f"{f'{module}.{name}'[:150]} in a header of the file. "
                                    "Nothing was run.")
        return _find_global(module, name, self._source)

    def persistent_load(self, pid):
        if self._storage_of is None:
            raise PthError(f"{self._source}: a storage where none can be")
        return self._storage_of(pid)


def _unpickle(file, source, storage_of=None, what="the pickle"):
    """Run one pickle of ``file`` with the restricted unpickler; errors -> PthError."""
    try:
        return _Unpickler(file, source, storage_of).load()
    except WeightsFileError:
        raise
    except Exception as e:                 # noqa: BLE001 - any error here is a bad file
        raise PthError(f"{source}: {what} is truncated or corrupt "
                       f"({type(e).__name__}: {str(e)[:200]})") from None


def _storage_entry(pid, storages, source) -> _Storage:
    """The :class:`_Storage` of a persistent id, made once per key (shared storages)."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise PthError(f"{source}: unexpected persistent id {pid!r:.100}")
    _, storage_type, key, _location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
        raise PthError(f"{source}: storage views (files of torch < 0.4) are not supported")
    if not isinstance(storage_type, _StorageType) or isinstance(storage_type, _TorchDtype):
        raise PthError(f"{source}: a storage of type {storage_type!r:.60}")
    if storage_type.dtype is None:
        raise PthError(f"{source}: a storage of type {storage_type!r}, which NumPy does not "
                       "have")
    if not isinstance(key, (str, int)) or not isinstance(numel, int) or numel < 0:
        raise PthError(f"{source}: a storage with key {key!r:.40} and size {numel!r:.40}")
    key = str(key)
    if key not in storages:
        storages[key] = _Storage(storage_type.dtype, key, numel)
    storage = storages[key]
    if (storage.dtype, storage.numel) != (storage_type.dtype, numel):
        raise PthError(f"{source}: storage {key!r} is used as {storage.numel} x "
                       f"{storage.dtype} and as {numel} x {storage_type.dtype}")
    return storage


def _empty_elements(numel, dtype, what):
    """An uninitialised 1-D array to read ``numel`` elements into (bfloat16: their bits)."""
    try:
        return np.empty(numel, dtype="<u2" if dtype == BFLOAT16 else dtype)
    except (MemoryError, ValueError) as e:
        raise PthError(f"{what}: cannot hold {numel} elements of {dtype} ({e}); the size in "
                       "the file is corrupt, or the file needs more memory") from None


def _finish_storage(data, dtype):
    return _bfloat16_to_float32(data) if dtype == BFLOAT16 else data


# --------------------------------------------------------------------------- zip layout
def _load_zip(source, f):
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise PthError(f"{source}: a damaged zip archive ({e}); is the download complete?") \
            from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or
                   (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            if names and all(n.endswith(".npy") for n in names):
                raise PthError(f"{source}: a NumPy .npz archive, not a PyTorch file (a minidetr "
                               "checkpoint? load it with minidetr.weights.load_checkpoint)")
            raise PthError(f"{source}: a zip archive, but not a PyTorch file (expected one "
                           f"<name>/data.pkl, found {pickles or 'none'})")
        prefix = pickles[0][:-len("data.pkl")]
        if any(n.startswith(prefix + "code/") for n in names):
            raise PthError(f"{source}: a TorchScript archive (torch.jit.save), not saved "
                           "weights; load it with torch.jit.load and save its state_dict()")
        if prefix + "byteorder" in names and \
                archive.read(prefix + "byteorder").strip() not in (b"little", b""):
            raise PthError(f"{source}: written on a big-endian machine; only little-endian "
                           "files are supported")
        storages = {}

        def storage_of(pid):
            storage = _storage_entry(pid, storages, source)
            if storage.data is None:
                storage.data = _read_zip_storage(archive, f"{prefix}data/{storage.key}",
                                                 storage, source)
            return storage

        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise PthError(f"{source}: {pickles[0]} is corrupt ({e})") from None
        return _unpickle(io.BytesIO(data), source, storage_of)


def _read_zip_storage(archive, member, storage, source):
    """The elements of one storage member (its CRC checked); shapes: (numel,)."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise PthError(f"{source}: the storage {member} is missing (an incomplete file?)") \
            from None
    nbytes = storage.numel * _itemsize(storage.dtype)
    if info.file_size != nbytes:
        raise PthError(f"{source}: the storage {member} has {info.file_size} bytes; the "
                       f"pickle says {storage.numel} elements of {storage.dtype}, {nbytes} "
                       "bytes")
    data = _empty_elements(storage.numel, storage.dtype, f"{source}: {member}")
    try:
        with archive.open(info) as member_file:
            got = member_file.readinto(memoryview(data).cast("B")) if nbytes else 0
            member_file.read(1)                       # at the end: the CRC is checked
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise PthError(f"{source}: the storage {member} is corrupt ({e})") from None
    if got != nbytes:
        raise PthError(f"{source}: the storage {member} ends after {got} of {nbytes} bytes")
    return _finish_storage(data, storage.dtype)


# --------------------------------------------------------------------------- legacy layout
def _load_legacy(source, f, size):
    def header(what):
        return _unpickle(f, source, None, what)

    if header("the first pickle") != LEGACY_MAGIC:
        raise PthError(f"{source}: a pickle, but not a PyTorch file (no PyTorch magic number "
                       "at the start)")
    if header("the protocol version") != LEGACY_PROTOCOL:
        raise PthError(f"{source}: an unknown legacy PyTorch protocol version")
    info = header("the system info")
    if isinstance(info, dict) and not info.get("little_endian", True):
        raise PthError(f"{source}: written on a big-endian machine; only little-endian files "
                       "are supported")
    start = f.tell()
    storages = {}
    _unpickle(f, source, lambda pid: _storage_entry(pid, storages, source))   # learn dtypes
    keys = header("the storage key list")
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise PthError(f"{source}: the storage key list does not match the storages the "
                       "object uses (a corrupt file)")
    for key in map(str, keys):
        storage = storages[key]
        count = f.read(8)
        if len(count) != 8:
            raise PthError(f"{source}: truncated: storage {key!r} is missing")
        numel = struct.unpack("<q", count)[0]
        nbytes = numel * _itemsize(storage.dtype)
        if numel != storage.numel or f.tell() + nbytes > size:
            raise PthError(f"{source}: storage {key!r} should hold {storage.numel} elements "
                           f"of {storage.dtype}; the file says {numel} and has "
                           f"{size - f.tell()} bytes left (truncated or corrupt)")
        data = _empty_elements(numel, storage.dtype, f"{source}: storage {key!r}")
        if f.readinto(memoryview(data).cast("B")) != nbytes:
            raise PthError(f"{source}: truncated inside storage {key!r}")
        storage.data = _finish_storage(data, storage.dtype)
    f.seek(start)                                                  # now build the arrays
    return _unpickle(f, source, lambda pid: _storage_entry(pid, storages, source))


# --------------------------------------------------------------------------- plain data
def _plain(obj, memo):
    """The pickle's result as plain data: records -> dicts, stand-ins -> values.

    Containers shared (or cyclic) in the file stay shared; arrays are returned as they are.
    """
    if isinstance(obj, (np.ndarray, np.generic, str, bytes, int, float, complex, type(None))):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, (_Record, dict)):
        out = collections.OrderedDict() if type(obj) is collections.OrderedDict else {}
        memo[id(obj)] = out
        for k, v in obj.items():
            out[_plain(k, memo)] = _plain(v, memo)
        return out
    if isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(_plain(v, memo) for v in obj)
        return out
    if isinstance(obj, (tuple, set, frozenset)):
        out = memo[id(obj)] = type(obj)(_plain(v, memo) for v in obj)
        return out
    if isinstance(obj, bytearray):
        return obj
    if isinstance(obj, _DtypeBox):
        return obj.dtype
    if isinstance(obj, _TorchDtype) and obj.dtype is not None:
        return obj.dtype if obj.dtype == BFLOAT16 else np.dtype(obj.dtype)
    if isinstance(obj, _Storage):                       # a bare storage: its elements
        return obj.data
    raise PthError(f"the file holds {obj!r:.80}, which is not data")


# --------------------------------------------------------------------------- entry point
def _not_pth_hint(head: bytes) -> str:
    if not head:
        return "the file is empty (0 bytes); is the download complete?"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if head.lstrip()[:1] == b"<":
        return "an HTML/XML page, not weights (a failed download?)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file, not a PyTorch file"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a .safetensors file (read it with load_safetensors)"
    if head[257:262] == b"ustar":
        return ("a tar archive: the format of torch < 0.4, which this reader does not "
                "support (load it with an old torch and save it again)")
    return "not a PyTorch .pth file (neither a zip archive nor a pickle)"


def load_pth(path):
    """The object saved in a ``.pth`` file, with NumPy arrays for its tensors.

    Reads both layouts of ``torch.save`` (zip and legacy) without importing torch and
    without running any code from the file; see the module docstring for what is allowed.

    Args:
        path: the ``.pth`` (or ``.pt``, ``.bin``) file.

    Returns:
        The saved object: dicts (``OrderedDict`` stays one), lists, tuples, numbers,
        strings, None, NumPy arrays (tensors, dtype/shape/bits kept; bfloat16 -> float32)
        and dicts for ``argparse.Namespace`` records.

    Raises:
        UnsafePickleError: the pickle names a global outside the allowed list (nothing was
            run); the message names the global.
        PthError: the file is missing, truncated, corrupt or not a PyTorch file.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise PthError(f"{source}: " + ("a folder, not a file" if path.is_dir() else
                                       "no such file"))
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            f.seek(0)
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                obj = _load_zip(source, f)
            elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                obj = _load_legacy(source, f, path.stat().st_size)
            else:
                raise PthError(f"{source}: {_not_pth_hint(head)}")
        return _plain(obj, {})
    except WeightsFileError as e:
        if str(e).startswith(source):
            raise
        raise type(e)(f"{source}: {e}") from None       # raised inside the pickle's calls
    except MemoryError:
        raise PthError(f"{source}: needs more memory than there is (a corrupt size in the "
                       "file, or a file too big for this machine)") from None
    except RecursionError:
        raise PthError(f"{source}: nested too deeply to be weights") from None
    except OSError as e:
        raise PthError(f"{source}: cannot be read ({e})") from None
    except Exception as e:                 # noqa: BLE001 - never a raw traceback for a file
        raise PthError(f"{source}: cannot be read as a PyTorch file "
                       f"({type(e).__name__}: {str(e)[:200]})") from e


__all__ = ["load_pth", "PthError", "UnsafePickleError", "ALLOWED_GLOBALS", "STORAGE_DTYPES",
           "TORCH_DTYPES"]
