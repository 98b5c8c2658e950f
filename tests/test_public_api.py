"""`__all__` is honest in every module: it names what exists, and every public class or function
a module defines is in it (so `from heinfer.x import *` and the docs show the real surface)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import heinfer

_SKIP = {"heinfer.__main__", "heinfer.ray_serve"}  # ray_serve needs the ray extra at import


def _modules() -> list[str]:
    names = ["heinfer"]
    for info in pkgutil.walk_packages(heinfer.__path__, "heinfer."):
        if info.name not in _SKIP:
            names.append(info.name)
    return names


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # an optional extra (torch, onnx) is not installed
        pytest.skip(f"{name}: {exc}")


@pytest.mark.parametrize("name", _modules())
def test_all_names_exist_and_cover_public_definitions(name: str) -> None:
    module = _module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    defined_here = [
        item
        for item, value in vars(module).items()
        if not item.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", None) == name
    ]
    unlisted = sorted(set(defined_here) - set(exported))
    assert not unlisted, f"{name} defines public {unlisted} outside __all__ (export or underscore)"
