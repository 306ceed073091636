"""One mechanism per file; importing this package imports (and so registers) them all.

Each module lists its public classes in ``__all__``; they are re-exported from
``efficient_attention``.
"""

import importlib
import pkgutil

__all__ = []
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
