"""Stage registry: (stage name, backend name) -> Stage class.

Backends register by import; a config entry names a stage and a backend, and the registry
returns the class whose ``Params`` model validates that entry's parameters.
"""

from __future__ import annotations

import importlib

from counterfactory.sample import Stage

# Modules that define stages; imported lazily so that `counterfactory --help` stays fast.
_MODULES = ("ingest", "localize", "segment", "edit", "qa", "verify", "models", "video")
_REGISTRY: dict[tuple[str, str], type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    _REGISTRY[(cls.name, cls.backend)] = cls
    return cls


def _load() -> None:
    for mod in _MODULES:  # cheap after the first time: modules are cached by Python
        importlib.import_module(f"counterfactory.stages.{mod}")


def get_backend(stage: str, backend: str) -> type[Stage]:
    _load()
    cls = _REGISTRY.get((stage, backend))
    if cls is None:
        stages = sorted({s for s, _ in _REGISTRY})
        if stage not in stages:
            raise ValueError(f"unknown stage {stage!r}; known stages: {', '.join(stages)}")
        backends = sorted(b for s, b in _REGISTRY if s == stage)
        raise ValueError(f"unknown backend {backend!r} for stage {stage!r}; known: {', '.join(backends)}")
    return cls
