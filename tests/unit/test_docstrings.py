"""`help()` on the public classes: each says what it is, not pydantic's or Enum's generic text."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import server
from server import config, errors, metrics, session

#: The modules whose classes the README names (settings sections, error codes, states, reports).
MODULES = [config, errors, metrics, session]


def public_classes(module: ModuleType) -> list[type]:
    return [
        value
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and not name.startswith("_")
    ]


CLASSES = sorted(
    {cls for module in MODULES for cls in public_classes(module)}
    | {value for value in map(vars(server).get, server.__all__) if inspect.isclass(value)},
    key=lambda cls: f"{cls.__module__}.{cls.__qualname__}",
)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__qualname__)
def test_a_public_class_has_its_own_docstring(cls: type) -> None:
    # `__doc__` unset falls back, in help() and inspect.getdoc, to BaseModel's or Enum's own.
    assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__module__}.{cls.__qualname__} has no docstring"


def test_the_classes_the_review_named_are_among_those_checked() -> None:
    names = {cls.__qualname__ for cls in CLASSES}
    assert {"LimitsSettings", "ShutdownReport", "ErrorCode", "SessionState"} <= names
