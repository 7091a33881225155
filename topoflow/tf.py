"""The one way topoflow imports TensorFlow.

XRootD's client library, loaded after TensorFlow in the same process, crashes (segmentation fault)
on its first connection; loaded before, both work. So the XRootD client is loaded first, whenever
it is installed, and every module that needs TensorFlow or Keras calls :func:`import_tensorflow`.
"""

from __future__ import annotations

import contextlib

from topoflow.extras import require


def import_tensorflow():
    """Import XRootD's client (if installed), then TensorFlow; return the ``tensorflow`` module."""
    with contextlib.suppress(ImportError):
        import XRootD.client  # noqa: F401  (load order matters, see the module docstring)
    return require("tensorflow", "train")
