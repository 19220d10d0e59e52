"""cloudpickle with one fix: modules of a ``ModuleType`` subclass travel by import name.

A function defined in a notebook cell is pickled by value, with the submodules of
its globals whose dotted names its code mentions. ``dist`` plus any attribute
named ``config`` (``model.config``) makes cloudpickle include
``torch.distributed.config``, a ``ConfigModuleInstance``: cloudpickle's module rule
matches only the exact type ``ModuleType``, so plain pickle takes over and fails
with ``TypeError: cannot pickle 'ConfigModuleInstance' object``. An importable
module needs no state: the ranks import it by name, as they do plain modules.

And one addition: code pickled by value keeps its file name (cloudpickle writes
``<dynamic-code>``), so a rank's stack can point at the notebook cell it came from.
"""

from __future__ import annotations

import importlib
import io
import sys
import types

import cloudpickle


_ANONYMOUS = "<dynamic-code>"


def _named(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj):
        if (isinstance(obj, types.ModuleType) and type(obj) is not types.ModuleType
                and sys.modules.get(obj.__name__) is obj):
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, types.CodeType) and obj.co_filename != _ANONYMOUS:
            return _named, (obj.replace(co_filename=_ANONYMOUS), obj.co_filename)
        return super().reducer_override(obj)


def dumps(obj) -> bytes:
    with io.BytesIO() as buffer:
        _Pickler(buffer).dump(obj)
        return buffer.getvalue()


loads = cloudpickle.loads
