"""Entry-point discovery: our own backend registered like any plugin, broken plugins reported."""

from __future__ import annotations

import importlib.metadata as md

import pytest

from lmkernel.plugins import discovery


class _FakeEntryPoint:
    def __init__(self, name, value, loader):
        self.name, self.value, self._loader = name, value, loader
        self.dist = None

    def load(self):
        return self._loader()


def test_mlx_is_registered_through_the_entry_point():
    names = {ep.name: ep.value for ep in md.entry_points(group="lmkernel.backends")}
    assert names.get("mlx") == "lmkernel.backends.mlx:backend"
    found = discovery.discover()
    status = found.get("mlx")
    assert status is not None and status.backend is not None
    assert status.availability.available, status.availability.reason


def test_broken_plugins_are_reported_not_fatal(monkeypatch, caplog):
    def boom():
        raise ImportError("No module named 'missing_engine'")

    real = md.entry_points(group="lmkernel.backends")
    fakes = [
        _FakeEntryPoint("broken", "broken_pkg:backend", boom),
        _FakeEntryPoint("wrongtype", "other_pkg:thing", lambda: object()),
    ]
    monkeypatch.setattr(discovery, "entry_points", lambda group: [*real, *fakes])
    found = discovery.discover()
    broken = {s.name: s.availability.reason for s in found.broken}
    assert broken["broken"] == "plugin failed to import: ImportError: No module named 'missing_engine'"
    assert broken["wrongtype"] == "entry point 'other_pkg:thing' is a object, not an lmkernel Backend"
    names = {b.name for b in found.available}
    assert "mlx" in names and not names & {"broken", "wrongtype"}  # the real plugins still load
    assert "plugin failed to import" in caplog.text


@pytest.mark.parametrize(("value", "expected"), [("mlx", ["mlx"]), ("other", []), (" mlx , x ", ["mlx"])])
def test_environment_variable_limits_backends(monkeypatch, value, expected):
    monkeypatch.setenv("LMKERNEL_BACKENDS", value)
    assert [s.name for s in discovery.discover().statuses] == expected
