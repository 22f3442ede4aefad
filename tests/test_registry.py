"""Registries find their members: the built-ins by importing their package, plug-ins through entry points."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest

from unlearn.core import registry
from unlearn.core.registry import PluginError, Registry


@pytest.fixture()
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "widget_plugin.py").write_text(
        "class Plain:\n    pass\n\n\nclass Other:\n    pass\n")
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("widget_plugin", "broken_plugin"):
        sys.modules.pop(name, None)


def _with_entry_points(monkeypatch, *points: tuple[str, str]) -> Registry:
    found = [EntryPoint(name, value, "unlearn.widgets") for name, value in points]
    monkeypatch.setattr(registry, "entry_points", lambda group: [p for p in found if p.group == group])
    return Registry("widget")


def test_an_undecorated_entry_point_registers_under_its_name(plugin_module, monkeypatch):
    widgets = _with_entry_points(monkeypatch, ("plain", "widget_plugin:Plain"))
    assert widgets.group == "unlearn.widgets"
    assert list(widgets) == ["plain"] and widgets["plain"].__name__ == "Plain"


def test_a_name_taken_by_another_component_is_one_line(plugin_module, monkeypatch):
    widgets = _with_entry_points(monkeypatch, ("plain", "widget_plugin:Plain"), ("plain", "widget_plugin:Other"))
    with pytest.raises(PluginError, match="widget plug-in 'plain' \\(widget_plugin:Other\\): the name is taken by "
                                          "widget_plugin.Plain"):
        widgets.choices()


def test_a_plugin_that_fails_to_load_is_named(plugin_module, monkeypatch):
    widgets = _with_entry_points(monkeypatch, ("broken", "broken_plugin:Anything"))
    with pytest.raises(PluginError, match="widget plug-in 'broken' .*failed to load: RuntimeError: boom"):
        "broken" in widgets  # noqa: B015 - the first read discovers
