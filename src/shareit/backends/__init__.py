"""The built-in backends, one module each; imported only when a mapping first uses one.

See :mod:`shareit.registry` for the name -> class table.

DESIGN fixes both ``shareit.backends()`` (a function) and this package's name.
Importing a backend module binds the package to the ``shareit.backends``
attribute, hiding the function, so the package itself is made callable and
does what the function does.
"""

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, dict[str, Any]]:
        from ..api import backends

        return backends()


sys.modules[__name__].__class__ = _CallableModule
