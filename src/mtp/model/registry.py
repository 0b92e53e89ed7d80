"""The head kinds by name: a class registers itself with ``@register_head("name")`` (importing :mod:`mtp.model`
imports every kind)."""

from __future__ import annotations

HEAD_KINDS: dict[str, type] = {}


def register_head(name: str):
    def wrap(cls):
        cls.kind = name
        HEAD_KINDS[name] = cls
        return cls
    return wrap
