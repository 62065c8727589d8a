"""The one error of every weights-file reader (``.pth``, ``.safetensors``).

:class:`WeightsFileError` is a ``ValueError``; its message always names the file and says
what is wrong with it (missing, truncated, corrupt, of another format, or asking for
something the reader refuses). Catching it catches :class:`~minidetr.weights.pth.PthError`,
:class:`~minidetr.weights.pth.UnsafePickleError` and
:class:`~minidetr.weights.safetensors_io.SafetensorsError`.
"""


class WeightsFileError(ValueError):
    """A weights file cannot be read; the message names the file and what is wrong."""


__all__ = ["WeightsFileError"]
