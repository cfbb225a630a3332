"""The method registry: one module per method, looked up by name."""

from __future__ import annotations

from ..errors import SettingsError
from .base import MergeMethod, MethodSettings, StepContext
from .dop import Dop
from .magmax import MagMax
from .nufilt import Nufilt
from .opcm import Opcm
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .weight_average import WeightAverage
from .wudi import Wudi

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Nufilt, WeightAverage, TaskArithmetic, Ties, MagMax, Opcm, Wudi, Dop)
}


def get_method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise SettingsError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "MethodSettings", "StepContext", "get_method"]
