"""Run the C body of a ``cupy.ElementwiseKernel`` on NumPy arrays, compiled by g++.

A ``cupy.ElementwiseKernel`` is a loop body in CUDA C plus two parameter lists::

    kernel = cupy.ElementwiseKernel("T x, T y, T a", "T z", "z = x * y + a", "mul_add")
    z = kernel(x, y, 0.5)                 # z[i] = x[i] * y[i] + 0.5, one GPU thread per i

CuPy writes the rest of the CUDA function around the body: ``typedef float T;`` for the
type placeholder, one reference per array parameter bound to element ``i``
(``const T &x = _raw_x[i];`` for an input, ``T &z = _raw_z[i];`` for an output, which
can be read and written), scalars passed by value, and the loop over ``i``.

:class:`CpuElementwiseKernel` takes the same constructor and call and writes the same
function as plain C++ for the CPU: the loop over ``i`` is a ``for`` loop, the body is
pasted unchanged. g++ compiles it into a shared library (cached in a temporary folder,
keyed by a hash of the source) that ctypes calls. A kernel written for CuPy therefore
runs, unchanged, on a machine without a GPU: the tests compare its results with a
readable NumPy computation there, and :mod:`minidetr.testing.fakecupy` uses it as its
``ElementwiseKernel``. It is for tests and for reading, not for speed.

Rounding: g++ compiles with ``-ffp-contract=off``, so ``a * b + c`` is a product rounded
to T and then a sum rounded to T, exactly as two NumPy ufuncs compute it (without the
flag g++ may contract it into one fused multiply-add, rounded once, on a CPU that has
one). Float arithmetic stays in float: ``sqrt(x)`` of a ``float`` is the float overload,
as in CUDA device code.

The part of CuPy's semantics that is supported:

* arguments are the inputs, then optionally all the outputs; outputs passed are updated
  in place (and returned), outputs not passed are allocated and returned (one array, or
  a tuple when there are several outputs or ``return_tuple=True``; ``None`` with
  ``no_return=True``);
* a one-letter type (``T``) is a placeholder, resolved from the dtype of the first array
  argument that has it; every other array with that placeholder must share the dtype;
  other type names are NumPy dtype names (``float32``, ``int64``, ...) and the array
  must have exactly that dtype;
* Python or NumPy numbers are scalars, cast to their parameter's type and passed by
  value; array arguments must all have one shape (no broadcasting);
* ``preamble``, ``loop_prep``, ``after_loop`` are pasted where CuPy pastes them;
  ``options`` (NVRTC flags) and ``reduce_dims`` are accepted and have no meaning here.

Not supported: broadcasting, ``raw`` parameters, the ``size=`` argument, float16 and
complex types, parameter names that start with ``_`` (reserved for the generated code).
"""
from __future__ import annotations

import ctypes
import getpass
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMPILER = "g++"
COMPILE_FLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared")

# NumPy dtype -> the C++ type CuPy writes for it.
C_TYPES = {np.dtype(np.bool_): "bool",
           np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char",
           np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
           np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
           np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
           np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# CUDA device code has float and double overloads of the math functions in the global
# namespace; in C++ those overloads live in std. These lines make ``sqrt(x)`` of a float
# call the float version on the CPU too.
_MATH_NAMES = ("abs", "fabs", "sqrt", "cbrt", "exp", "exp2", "expm1", "log", "log2", "log10",
               "log1p", "pow", "hypot", "sin", "cos", "tan", "asin", "acos", "atan", "atan2",
               "sinh", "cosh", "tanh", "erf", "erfc", "floor", "ceil", "round", "trunc",
               "fmin", "fmax", "fma", "copysign", "isnan", "isinf", "isfinite", "min", "max")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = {"preamble", "loop_prep", "after_loop", "no_return", "return_tuple",
                      "reduce_dims", "options"}


def why_no_compiler(compiler: str = COMPILER) -> str | None:
    """None when ``compiler`` is on the PATH, else a reason (for skip messages)."""
    return None if shutil.which(compiler) else f"{compiler} is not installed"


def cache_directory() -> Path:
    """Where compiled kernels are kept: one folder per user in the temporary directory."""
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return Path(tempfile.gettempdir()) / f"minidetr-elementwise-{user}"


# --------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    """One parameter of a kernel: ``T x`` is name ``x``, type ``T`` (a placeholder);
    ``float32 x`` is type ``float32`` with ``dtype`` float32."""
    name: str
    type: str
    dtype: np.dtype | None          # None for a placeholder
    is_input: bool

    def c_type(self) -> str:
        """The C++ spelling: the placeholder itself (typedef'd), or the dtype's C type."""
        return self.type if self.dtype is None else C_TYPES[self.dtype]


def parse_params(text: str, is_input: bool, kernel: str = "kernel") -> tuple:
    """``"T x, float32 y"`` -> ``(Param('x', 'T', None, ...), Param('y', 'float32', ...))``."""
    if not text.strip():
        return ()
    params = []
    for item in text.split(","):
        words = item.split()
        if words[:1] == ["raw"]:
            raise ValueError(f"ElementwiseKernel {kernel!r}: 'raw' parameters ({item.strip()!r}) "
                             "are not supported by the CPU harness")
        if len(words) != 2:
            raise ValueError(f"ElementwiseKernel {kernel!r}: cannot read the parameter "
                             f"{item.strip()!r}; expected 'TYPE NAME', e.g. 'T x' or 'float32 x'")
        type_name, name = words
        if not _IDENTIFIER.fullmatch(name) or name == "i" or name.startswith("_"):
            raise ValueError(f"ElementwiseKernel {kernel!r}: invalid parameter name {name!r} "
                             "(an identifier, not 'i', not starting with '_')")
        dtype = None
        if len(type_name) > 1:                            # a dtype name, not a placeholder
            try:
                dtype = np.dtype(type_name)
            except TypeError:
                dtype = None
            if dtype not in C_TYPES:
                raise ValueError(f"ElementwiseKernel {kernel!r}: parameter {name!r} has type "
                                 f"{type_name!r}, which is neither a one-letter placeholder "
                                 f"nor one of {sorted(str(d) for d in C_TYPES)}")
        elif not type_name.isalpha():
            raise ValueError(f"ElementwiseKernel {kernel!r}: the type placeholder of "
                             f"{name!r} must be a letter, got {type_name!r}")
        params.append(Param(name, type_name, dtype, is_input))
    return tuple(params)


# --------------------------------------------------------------------------- the kernel
class CpuElementwiseKernel:
    """``cupy.ElementwiseKernel`` for NumPy arrays: the same C body, compiled by g++.

    Args:
        in_params, out_params: parameter lists, e.g. ``"T x, T y"`` and ``"T z"``.
        operation: the loop body in C (CUDA C without CUDA built-ins), run for every i.
        name: the name of the generated function (a C identifier).
        **kwargs: ``preamble``, ``loop_prep``, ``after_loop``, ``no_return``,
            ``return_tuple`` as in CuPy; ``reduce_dims`` and ``options`` are ignored.

    Compilation happens at the first call for each set of types, as in CuPy.
    """

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 **kwargs):
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"ElementwiseKernel: invalid kernel name {name!r} "
                             "(it must be a C identifier)")
        unknown = sorted(set(kwargs) - _KEYWORDS)
        if unknown:
            raise TypeError(f"ElementwiseKernel {name!r}: unsupported arguments {unknown}; "
                            f"the CPU harness knows {sorted(_KEYWORDS)}")
        self.name = name
        self.in_params = parse_params(in_params, True, name)
        self.out_params = parse_params(out_params, False, name)
        names = [p.name for p in self.in_params + self.out_params]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"ElementwiseKernel {name!r}: parameter names {duplicated} "
                             "appear more than once")
        if not self.out_params:
            raise ValueError(f"ElementwiseKernel {name!r}: needs at least one output")
        self.operation = operation
        self.preamble = kwargs.get("preamble", "")
        self.loop_prep = kwargs.get("loop_prep", "")
        self.after_loop = kwargs.get("after_loop", "")
        self.no_return = bool(kwargs.get("no_return", False))
        self.return_tuple = bool(kwargs.get("return_tuple", False))
        self._functions = {}            # (types, scalar names) -> the loaded C function

    def __repr__(self):
        return (f"CpuElementwiseKernel({self.name!r}: "
                f"{', '.join(f'{p.type} {p.name}' for p in self.in_params)} -> "
                f"{', '.join(f'{p.type} {p.name}' for p in self.out_params)})")

    # ------------------------------------------------------------------ calling
    def __call__(self, *args):
        """Run the kernel: ``kernel(*inputs)`` or ``kernel(*inputs, *outputs)``."""
        types, scalars, shape = self._prepare(args)
        nin = len(self.in_params)
        outputs = list(args[nin:]) or [np.empty(shape, types.get(p.type, p.dtype))
                                       for p in self.out_params]
        if self.no_return:
            result = None
        elif len(outputs) == 1 and not self.return_tuple:
            result = outputs[0]
        else:
            result = tuple(outputs)
        size = int(np.prod(shape))
        if size == 0:
            return result

        # Contiguous buffers for the C loop. An output that is a strided view is computed
        # in a contiguous copy (which holds its current values: the body may read them)
        # and copied back afterwards.
        inputs = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a
                  for a in args[:nin]]
        buffers = [np.ascontiguousarray(out) for out in outputs]
        holders = []                     # keep every argument alive during the call
        for p, a in zip(self.in_params + self.out_params, inputs + buffers):
            if p.name in scalars:
                a = np.array(a, dtype=types.get(p.type, p.dtype))
            holders.append(a)
        pointers = (ctypes.c_void_p * len(holders))(*[h.ctypes.data for h in holders])
        self._function(types, scalars)(size, pointers)
        for out, buffer in zip(outputs, buffers):
            if buffer is not out:
                out[...] = buffer
        return result

    def source(self, *args) -> str:
        """The C++ file that ``kernel(*args)`` compiles (the arguments decide the types,
        and which inputs are scalars passed by value), e.g. ``source(x, y, 0.5)``."""
        types, scalars, _ = self._prepare(args)
        return _generate_source(self, types, scalars)

    def _prepare(self, args):
        """Check the arguments; return ``(placeholder -> dtype, names of the scalar
        inputs, the loop's shape)``."""
        nin, nout = len(self.in_params), len(self.out_params)
        if len(args) not in (nin, nin + nout):
            raise TypeError(f"ElementwiseKernel {self.name!r} takes {nin} arguments (the "
                            f"inputs) or {nin + nout} (inputs, then outputs), got {len(args)}")
        given = list(zip(self.in_params + self.out_params, args))
        for p, a in given:
            self._check_argument(p, a)
        types = self._resolve_types(given)
        shape = self._common_shape(given)
        scalars = frozenset(p.name for p, a in given if not isinstance(a, np.ndarray))
        return types, scalars, shape

    def _check_argument(self, p, a):
        kind = "output" if not p.is_input else "input"
        if isinstance(a, np.ndarray):
            if a.dtype not in C_TYPES:
                raise TypeError(f"ElementwiseKernel {self.name!r}: {kind} {p.name!r} has dtype "
                                f"{a.dtype}, which the CPU harness does not support")
            if not p.is_input and not a.flags.writeable:
                raise ValueError(f"ElementwiseKernel {self.name!r}: output {p.name!r} is a "
                                 "read-only array")
            return
        if not p.is_input:
            raise TypeError(f"ElementwiseKernel {self.name!r}: output {p.name!r} must be a "
                            f"NumPy array, got {type(a).__name__}")
        if isinstance(a, (bool, int, float, np.bool_, np.integer, np.floating)):
            return
        raise TypeError(f"ElementwiseKernel {self.name!r}: input {p.name!r} must be a NumPy "
                        f"array or a real number, got {type(a).__name__}")

    def _resolve_types(self, given) -> dict:
        """Placeholder -> dtype, from the array arguments; checks every dtype and scalar."""
        types, source = {}, {}
        for p, a in given:
            if not isinstance(a, np.ndarray):
                continue
            if p.dtype is not None:
                if a.dtype != p.dtype:
                    raise TypeError(f"ElementwiseKernel {self.name!r}: {p.name!r} is declared "
                                    f"{p.type} but the array has dtype {a.dtype}")
            elif p.type not in types:
                types[p.type], source[p.type] = a.dtype, p.name
            elif a.dtype != types[p.type]:
                raise TypeError(f"ElementwiseKernel {self.name!r}: dtype mismatch for the type "
                                f"placeholder {p.type}: {p.type} = {types[p.type]} (from "
                                f"{source[p.type]!r}) but {p.name!r} has dtype {a.dtype}; "
                                f"cast with .astype() first")
        for p in self.in_params + self.out_params:
            if p.dtype is None and p.type not in types:
                raise TypeError(f"ElementwiseKernel {self.name!r}: cannot determine the type "
                                f"placeholder {p.type} of {p.name!r}: no array argument has "
                                "it (pass an array, or the outputs)")
        for p, a in given:
            if not isinstance(a, np.ndarray):
                target = types.get(p.type, p.dtype)
                if not np.can_cast(np.asarray(a).dtype, target, casting="same_kind"):
                    raise TypeError(f"ElementwiseKernel {self.name!r}: the scalar {a!r} for "
                                    f"{p.name!r} cannot be cast to {target}")
        return types

    def _common_shape(self, given) -> tuple:
        shapes = {p.name: a.shape for p, a in given if isinstance(a, np.ndarray)}
        if not shapes:
            raise TypeError(f"ElementwiseKernel {self.name!r}: the loop size is undecided (no "
                            "array argument; CuPy's size= is not supported by the harness)")
        if len(set(shapes.values())) > 1:
            raise ValueError(f"ElementwiseKernel {self.name!r}: all array arguments must have "
                             f"one shape (the CPU harness does not broadcast), got {shapes}")
        return next(iter(shapes.values()))

    # ------------------------------------------------------------------ compiling
    def _function(self, types: dict, scalars: frozenset):
        """The compiled C function for these types and scalars (compiled on first use)."""
        key = (tuple(sorted((k, v.str) for k, v in types.items())), scalars)
        function = self._functions.get(key)
        if function is None:
            library = build_library(_generate_source(self, types, scalars), self.name,
                                    _describe(types))
            function = getattr(ctypes.CDLL(str(library)), self.name)
            function.argtypes = [ctypes.c_ssize_t, ctypes.POINTER(ctypes.c_void_p)]
            function.restype = None
            self._functions[key] = function
        return function


def _describe(types: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in sorted(types.items())) or "no placeholders"


def _generate_source(kernel: CpuElementwiseKernel, types: dict, scalars: frozenset) -> str:
    """The C++ file: typedefs, the preamble, and one function holding the loop over i.

    The function receives the element count and an array of pointers, one per parameter
    (a scalar's points at its value). The user's code is pasted after ``#line`` markers,
    so that g++ reports an error as ``mul_add operation:1:...``, the kernel's name and
    the line in its operation, rather than a line of a generated file.
    """
    lines = [f"// ElementwiseKernel {kernel.name!r} on the CPU "
             f"(minidetr.testing.elementwise_harness), {_describe(types)}",
             f"// {COMPILER} {' '.join(COMPILE_FLAGS)}",
             "#include <algorithm>", "#include <cmath>", "#include <cstddef>",
             "// The float overloads of the math functions, as in CUDA device code:"]
    for start in range(0, len(_MATH_NAMES), 6):
        lines.append(" ".join(f"using std::{f};" for f in _MATH_NAMES[start:start + 6]))
    lines += [f"typedef {C_TYPES[dtype]} {name};" for name, dtype in sorted(types.items())]

    def paste(label, code, indent):
        if code.strip():
            lines.append(f'#line 1 "{kernel.name} {label}"')
            lines.extend(indent + line for line in (code + ";").splitlines())
            lines.append(f'#line {len(lines) + 2} "{kernel.name} generated code"')

    paste("preamble", kernel.preamble, "")
    params = kernel.in_params + kernel.out_params
    lines.append(f'extern "C" void {kernel.name}(std::ptrdiff_t _n, void** _args) {{')
    for k, p in enumerate(params):
        t = p.c_type()
        if p.name in scalars:                              # by value, like CuPy's scalars
            lines.append(f"    const {t} {p.name} = *static_cast<const {t}*>(_args[{k}]);")
        elif p.is_input:
            lines.append(f"    const {t}* const _raw_{p.name} = "
                         f"static_cast<const {t}*>(_args[{k}]);")
        else:
            lines.append(f"    {t}* const _raw_{p.name} = static_cast<{t}*>(_args[{k}]);")
    paste("loop_prep", kernel.loop_prep, "    ")
    lines.append("    for (std::ptrdiff_t i = 0; i < _n; ++i) {")
    for p in params:
        if p.name not in scalars:                          # element i of every array
            const = "const " if p.is_input else ""
            lines.append(f"        {const}{p.c_type()}& {p.name} = _raw_{p.name}[i];")
    paste("operation", kernel.operation, "        ")
    lines.append("    }")
    paste("after_loop", kernel.after_loop, "    ")
    lines.append("}")
    return "\n".join(lines) + "\n"


def build_library(source: str, name: str, what: str = "") -> Path:
    """Compile ``source`` into a shared library, or reuse the one already built from it.

    The file name holds a hash of the compiler, its flags and the source, so a changed
    kernel is rebuilt and an unchanged one never is (also across processes). Files are
    written under temporary names and renamed, so concurrent test workers do not clash.
    """
    digest = hashlib.sha256("\0".join([COMPILER, *COMPILE_FLAGS, source]).encode()).hexdigest()
    directory = cache_directory()
    stem = directory / f"{name}-{digest[:20]}"
    library = stem.with_suffix(".so")
    if library.exists():
        return library
    reason = why_no_compiler()
    if reason:
        raise RuntimeError(f"ElementwiseKernel {name!r} cannot run on the CPU: {reason}")
    directory.mkdir(parents=True, exist_ok=True)
    private = f"{stem}.{os.getpid()}"
    Path(private + ".cpp").write_text(source)
    os.replace(private + ".cpp", stem.with_suffix(".cpp"))
    command = [COMPILER, *COMPILE_FLAGS, str(stem.with_suffix(".cpp")), "-o", private + ".so"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ElementwiseKernel {name!r} ({what}) does not compile:\n"
                           f"$ {' '.join(command)}\n{result.stderr}")
    os.replace(private + ".so", library)
    return library


__all__ = ["CpuElementwiseKernel", "Param", "parse_params", "build_library", "cache_directory",
           "why_no_compiler", "COMPILER", "COMPILE_FLAGS", "C_TYPES"]
