"""The notebook's model, task and data interfaces (``from fedjax_core.api.interfaces import TaskInterface``).

Defined in :mod:`fedjax_core.runtime.interfaces`, which the envoy's worker imports when it unpickles them.
"""
from __future__ import annotations

from fedjax_core.runtime.interfaces import DataInterface, ModelInterface, TaskError, TaskInterface

__all__ = ["DataInterface", "ModelInterface", "TaskError", "TaskInterface"]
