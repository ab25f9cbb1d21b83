"""The one registry type: lazy entries, aliases, entry points, one-line errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from safe_diffusion.common.errors import InputError
from safe_diffusion.common.registry import Registry


def test_lazy_entries_import_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_plugin_mod.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("things")
    reg.register("lazy", "lazy_plugin_mod:VALUE", summary="a lazy one", aliases=("l",))
    assert "lazy_plugin_mod" not in sys.modules and reg.names() == ["lazy"]
    assert reg.get("L") == 42 and "lazy_plugin_mod" in sys.modules
    assert reg.entry("lazy").summary == "a lazy one" and reg.canonical("l") == "lazy"


def test_unknown_names_and_taken_names():
    reg = Registry("judges")
    reg.register("q16", object(), summary="x")
    with pytest.raises(InputError, match=r"^unknown judge 'nope'; choose from: q16$"):
        reg.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("Q16", object())
    reg.register("q16", 1, replace=True)
    assert reg.get("q16") == 1
    reg.register("broken", "no_such_module_anywhere:thing")
    with pytest.raises(InputError, match="cannot be loaded"):
        reg.get("broken")


def test_decorator_registers_and_returns_the_object():
    reg = Registry("methods")

    @reg.register("mine", summary="decorated")
    class Mine:
        pass

    assert reg.get("mine") is Mine


def test_entry_points_register_without_editing_the_package(tmp_path, monkeypatch):
    dist = tmp_path / "plugin_dist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-dist\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("""
        [safe_diffusion.widgets]
        from-plugin = plugin_widget_mod:WIDGET
    """)
    )
    (tmp_path / "plugin_widget_mod.py").write_text("WIDGET = 'made elsewhere'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widgets")
    assert "from-plugin" in reg and reg.get("from-plugin") == "made elsewhere"
