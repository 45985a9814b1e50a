"""Fixtures of the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(obj, names) -> {name: 0}, counting each call of obj.name from then on."""

    def install(obj, names):
        calls = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(obj, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(obj, name, spy)
        return calls

    return install
