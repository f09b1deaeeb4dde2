"""The backbone registry: families found by file name or entry point, with no list to edit; the
backbones stand on the schema alone (no import runs back up to the recipe loader)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mpo.backbones import registry
from mpo.backbones.base import Backbone
from mpo.backbones.registry import (
    UnknownFamily,
    builtin_families,
    get_backbone_class,
    known_families,
    register_backbone,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpo" / "backbones"
FAMILIES = ("sdxl", "cogvideox", "wan", "sd3", "flux")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_every_family_file_is_found_by_its_name():
    assert set(FAMILIES) <= set(builtin_families())
    assert not {"base", "registry", "schedules", "tiny"} & set(builtin_families())
    for name in builtin_families():
        cls = get_backbone_class(name)
        assert cls.family == name and issubclass(cls, Backbone)
        assert cls.__module__ == f"mpo.backbones.{name}"


def test_unknown_family_names_every_known_one():
    with pytest.raises(UnknownFamily) as err:
        get_backbone_class("pixart")
    message = str(err.value)
    assert message.startswith("model.family='pixart' is not a known backbone family")
    for name in FAMILIES:
        assert f"'{name}'" in message


def test_no_module_names_a_family_outside_its_own_file():
    """base, registry, schedules and tiny import no family; no backbone imports the recipe loader."""
    families = {f"mpo.backbones.{name}" for name in builtin_families()}
    for name in ("base", "registry", "schedules", "tiny", "__init__"):
        found = _imports(PACKAGE / f"{name}.py") & families
        assert not found, f"mpo/backbones/{name}.py imports {found}"
    for path in PACKAGE.glob("*.py"):
        assert "mpo.config" not in _imports(path), f"{path.name} imports mpo.config"
    for path in (ROOT / "mpo").glob("*.py"):  # the generic stages never import a family directly
        assert not _imports(path) & families, f"mpo/{path.name} imports a family module"


def test_importing_the_package_loads_no_family():
    code = (
        "import sys, mpo.backbones, mpo.backbones.tiny, mpo.backbones.schedules, mpo.config, mpo.train;"
        "print(sorted(m for m in sys.modules if m.startswith('mpo.backbones.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = eval(out.stdout.strip())
    assert set(loaded) <= {
        "mpo.backbones.base",
        "mpo.backbones.registry",
        "mpo.backbones.schedules",
        "mpo.backbones.tiny",
    }


class _Toy(Backbone):
    """Just enough of a class to register (never instantiated)."""

    modality = "image"


def test_registering_a_taken_name_is_refused_and_the_same_class_again_is_not():
    register_backbone("toy-registry")(_Toy)
    try:
        assert get_backbone_class("toy-registry") is _Toy and "toy-registry" in known_families()
        register_backbone("toy-registry")(_Toy)  # a reload of the same class
        other = type("_Toy", (Backbone,), {"modality": "image", "__module__": "elsewhere"})
        with pytest.raises(ValueError, match=r"already registered by tests\.test_registry\._Toy"):
            register_backbone("toy-registry")(other)
        with pytest.raises(ValueError, match=r"already registered"):
            register_backbone("sdxl")(_Toy)
        with pytest.raises(TypeError, match="not a Backbone subclass"):
            register_backbone("not-a-backbone")(dict)
    finally:
        registry.unregister_backbone("toy-registry")
    assert "toy-registry" not in known_families()


def _install_entry_point(root: Path, name: str, value: str) -> None:
    """What ``pip install`` of a package declaring the entry point leaves on sys.path."""
    info = root / "toy_family_pkg-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{name} = {value}\n")


def test_entry_points_add_families_and_broken_ones_say_which(tmp_path, monkeypatch):
    _install_entry_point(tmp_path, "toy-ep", "tests.test_registry:_Toy")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "toy-ep" in known_families()
        assert get_backbone_class("toy-ep") is _Toy and _Toy.family == "toy-ep"
    finally:
        registry.unregister_backbone("toy-ep")

    broken = tmp_path / "broken"
    _install_entry_point(broken, "toy-broken", "no_such_module_anywhere:Thing")
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(
        ImportError, match=r"model\.family='toy-broken': entry point toy-broken = .*cannot be imported"
    ):
        get_backbone_class("toy-broken")


@pytest.mark.parametrize("family", FAMILIES)
def test_production_loading_never_builds_a_tiny_model(family, tmp_path):
    """Only the registry's load_backbone builds for model.tiny; a family's own load() is what real
    checkpoints go through, and it fails on a missing folder without writing anything."""
    from mpo.backbones.base import ModelPathError
    from mpo.schema import ModelConfig

    missing = tmp_path / "missing"
    with pytest.raises(ModelPathError, match=r"model\.path=.*missing"):
        get_backbone_class(family).load(ModelConfig(family=family, path=str(missing), tiny=True))
    assert not missing.exists()
