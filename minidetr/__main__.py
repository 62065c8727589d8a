"""``python -m minidetr ...``: see :mod:`minidetr.cli`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
