"""Optional dependencies. topoflow installs by tier (pip extras: spark, generate, train, pipeline), so
a container image for one stage lacks the others' packages; a stage that needs a missing one says
which extra brings it instead of failing with a bare ImportError."""

from __future__ import annotations

import importlib
from types import ModuleType

from topoflow.errors import TopoflowError


def missing(module: str, extra: str) -> TopoflowError:
    """The error for ``module`` not being installed: it names the command that installs ``extra``."""
    return TopoflowError(f"{module} is not installed; it comes with topoflow's {extra!r} extra: "
                         f"pip install 'topoflow[{extra}]'")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, which topoflow's ``extra`` provides (a missing dependency of it counts too)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise missing(e.name or module, extra) from e
