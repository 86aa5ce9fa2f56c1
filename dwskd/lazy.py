"""Names a package exports but imports on first use (PEP 562 ``__getattr__``).

Why: ``import dwskd`` and ``import dwskd.data`` must not load torch, so that the commands'
``--help`` and refusals stay instant; the heavy names load when first touched.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, table: Mapping[str, tuple[str, str]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``table`` (name -> (module,
    attribute)); a loaded name is stored in ``namespace`` so later lookups skip the hook."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = table[name]
        namespace[name] = value = getattr(importlib.import_module(module), attribute)
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
