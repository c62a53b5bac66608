"""The layers import one way: ops <- modeling <- library (config, trainer, regularizers) <- recipes <- study.

Read from the source (every import statement, relative ones resolved, inside functions too): a module of a
layer may not import a layer above it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from x import y`` gives x and x.y), relative imports resolved."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


LAYERS = {  # layer -> what it must not import
    "hf_dreg/ops": ("hf_dreg.modeling", "hf_dreg.regularizers", "hf_dreg.trainer", "hf_dreg.config", "hf_dreg.recipes", "study"),
    "hf_dreg/modeling": ("hf_dreg.regularizers", "hf_dreg.trainer", "hf_dreg.recipes", "study"),
    "hf_dreg/regularizers": ("hf_dreg.trainer", "hf_dreg.recipes", "study"),
    "hf_dreg": ("study",),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_layer_imports_nothing_above_it(layer):
    forbidden = LAYERS[layer]
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    wrong = [f"{f.relative_to(ROOT)} imports {name}" for f in files for name in sorted(imports_of(f))
             if any(name == x or name.startswith(x + ".") for x in forbidden)]
    assert not wrong, wrong


def test_the_check_sees_an_upward_import():
    probe = ROOT / "hf_dreg" / "ops" / "formulas.py"
    assert "hf_dreg.ops.activations" in imports_of(probe)  # relative import resolved
    assert any(n.startswith("hf_dreg.modeling") for n in imports_of(ROOT / "hf_dreg" / "modeling" / "hooks.py"))


def test_the_wheel_ships_no_study():
    from setuptools import find_packages

    packages = find_packages(str(ROOT), include=["hf_dreg*"])
    assert "hf_dreg" in packages and "hf_dreg.recipes" in packages and "hf_dreg.ops" in packages
    assert not [p for p in packages if "study" in p]
    top = sorted(p.stem for p in (ROOT / "hf_dreg").glob("*.py"))
    assert len(top) <= 12 and not {"sweep", "report", "baselines", "baselines_report"} & set(top), top


def test_the_readme_flags_table_has_every_dreg_config_flag():
    from hf_dreg import DREGConfig

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Flags"):]
    table = table[: table.index("\n## ", 1)]
    missing = [name for name in DREGConfig.field_names() if f"| `{name}` |" not in table]
    assert not missing, f"README flags table lacks {missing}"
