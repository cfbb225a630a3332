"""The method registry: one module per method, looked up by name."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..errors import SettingsError
from ..lineage import LineageRecord
from .base import MergeMethod, MethodSettings, Source, StepContext
from .dop import Dop
from .magmax import MagMax
from .nufilt import Nufilt
from .opcm import Opcm
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .weight_average import WeightAverage
from .wudi import Wudi

METHODS: dict[str, type[MergeMethod[Any]]] = {
    m.name: m for m in (Nufilt, WeightAverage, TaskArithmetic, Ties, MagMax, Opcm, Wudi, Dop)
}


def get_method(name: str) -> type[MergeMethod[Any]]:
    try:
        return METHODS[name]
    except KeyError:
        raise SettingsError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def resolve_settings(method_cls: type[MergeMethod[Any]], inherited: dict[str, Any], options: dict[str, Any]) -> Any:
    """The method's Settings from inherited values overridden by explicit ones; SettingsError names each problem.

    An explicit named setting (`profile`) other than the inherited one replaces the inherited values: they were
    the old profile's, and would otherwise override the new profile's."""
    if "profile" in options and inherited.get("profile") != options["profile"]:
        inherited = {}
    if inherited:  # a lineage record: what it lacks, it was merged without
        inherited = {**method_cls.Settings.added_since_records, **inherited}
    try:
        return method_cls.Settings(**{**inherited, **options})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SettingsError(f"settings for method {method_cls.name}: {problems}") from None


def recorded(record: LineageRecord) -> tuple[type[MergeMethod[Any]], MethodSettings]:
    """The method and settings a lineage record was merged with, for asking the method's hooks."""
    method_cls = get_method(record.method)
    return method_cls, resolve_settings(method_cls, record.settings, {})


__all__ = ["METHODS", "MergeMethod", "MethodSettings", "Source", "StepContext", "get_method", "recorded",
           "resolve_settings"]
