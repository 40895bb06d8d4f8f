"""One small registry type, used for defenses and judges alike.

    from bench.registry import Registry
    JUDGES = Registry("judge", entry_point_group="realign.judges")

    @JUDGES.register("keyword")          # eager: the class is registered when its module imports
    class KeywordJudge: ...

    JUDGES.register_lazy("llama_guard", "bench.judges.llm:LlamaGuard")   # imported on first get()
    JUDGES.get("keyword")                # -> the class
    JUDGES.names()                       # every name, including third-party entry points

Third-party packages add entries through the entry-point group (a `realign.defenses` entry point
`name = "pkg.module:Class"`); they are listed without being imported, and loaded on first use.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from bench.errors import UserError, did_you_mean


class Registry:
    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.group = entry_point_group
        self._objects: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}
        self._scanned = False

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj):
            if name in self._objects and self._objects[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            obj.registry_name = name
            self._objects[name] = obj
            return obj

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        """`target` is 'package.module:Attribute'; nothing is imported until get(name)."""
        self._lazy.setdefault(name, target)

    def _scan_entry_points(self) -> None:
        if self._scanned or not self.group:
            return
        self._scanned = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._objects:
                self._lazy.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._scan_entry_points()
        return sorted(set(self._objects) | set(self._lazy))

    def target(self, name: str) -> str | None:
        """Where a lazily registered entry lives (for listings that must not import it)."""
        self._scan_entry_points()
        return self._lazy.get(name)

    def get(self, name: str) -> Any:
        self._scan_entry_points()
        if name not in self._objects:
            if name not in self._lazy:
                known = ", ".join(self.names()) or "none"
                raise UserError(
                    f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; registered: {known} "
                    "(see `realign list`)"
                )
            module, _, attr = self._lazy[name].partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise UserError(f"{self.kind} {name!r} could not be loaded from {self._lazy[name]}: {exc}") from None
            self._objects.setdefault(name, obj)
            # the class's own name, not one inherited from a registered parent (a judge or set that
            # subclasses another would otherwise take its parent's name when the parent loaded first,
            # and with it the parent's cache keys and fresh-process constructor)
            if "registry_name" not in vars(obj):
                obj.registry_name = name
        return self._objects[name]
