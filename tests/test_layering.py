"""The package's layers (docs/architecture.md), checked on the source with ``ast``.

Every module belongs to one layer; a module may import from its own layer and the
layers below it, never from a layer above (imports inside functions count too).
The old import paths of the compat modules keep re-exporting the same objects, and
no public function or class name is defined twice.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = {
    "efficient_attention": ROOT / "efficient_attention",
    "efficient_fairseq": ROOT / "plugins" / "efficient_fairseq",
    "efficient_transformers": ROOT / "plugins" / "efficient_transformers",
}

# Lowest first.  A module belongs to the layer of the longest prefix that names it or a package above it;
# "efficient_attention" itself (the package facade) is matched exactly.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    (
        "core",
        tuple(
            f"efficient_attention.{m}"
            for m in (
                "errors",
                "options",
                "capabilities",
                "masks",
                "functional",
                "layouts",
                "block_mask",
                "local_window",
                "quant_noise",
                "base",
                "registry",
            )
        ),
    ),
    ("kernels", ("efficient_attention.kernels",)),
    ("mechanisms: functionals", ("efficient_attention.sparse",)),
    ("mechanisms: modules", ("efficient_attention.attentions",)),
    ("mechanisms: context parallel", ("efficient_attention.distributed",)),
    (
        "compat",
        (
            "efficient_attention.compat",
            # the older import paths, thin re-exports of compat modules
            "efficient_attention.local_attention",
            "efficient_attention.sparse.openai",
            "efficient_attention.sparse.attention_grid",
            "efficient_attention.sparse.mask_compat",
        ),
    ),
    ("package facade", ("efficient_attention",)),
    (
        "tools",
        (
            "efficient_attention.__main__",
            "efficient_attention.info",
            "efficient_attention.testing",
            "efficient_attention.benchmark",
        ),
    ),
    ("plugins", ("efficient_fairseq", "efficient_transformers")),
]

# Older import path -> the compat module it re-exports.
OLD_PATHS = {
    "efficient_attention.local_attention": "efficient_attention.compat.local_attention",
    "efficient_attention.sparse.openai": "efficient_attention.compat.openai",
    "efficient_attention.sparse.attention_grid": "efficient_attention.compat.attention_grid",
    "efficient_attention.sparse.mask_compat": "efficient_attention.compat.mask_attention",
}


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix == "efficient_attention"
            if module == prefix or (not exact_only and module.startswith(prefix + ".")):
                if len(prefix) > best_len:
                    best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(
            f"module {module} is in no layer: add it to LAYERS in tests/test_layering.py "
            "(and to the diagram in docs/architecture.md)"
        )
    return best


def _imports(module: str, path: pathlib.Path) -> Iterator[Tuple[int, str]]:
    """``(line, imported module)`` for every import of one of our modules, at any depth of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` imports the submodule pkg.sub; ``from pkg import name`` imports pkg
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import a.b.c`` of a name inside a module
                target = target.rpartition(".")[0]
            if target:
                yield node.lineno, target


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_layer_above(module):
    own = layer_of(module)
    path = MODULES[module]
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {module} (layer '{LAYERS[own][0]}') imports {target} "
        f"(layer '{LAYERS[layer_of(target)][0]}', above it)"
        for line, target in _imports(module, path)
        if layer_of(target) > own
    ]
    assert not wrong, "\n".join(wrong + ["move the code down a layer or the caller up (docs/architecture.md)"])


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..attentions import local\n    import efficient_attention.compat.openai\n")
    found = [t for _, t in _imports("efficient_attention.kernels.m", src)]
    assert found == ["efficient_attention.attentions.local", "efficient_attention.compat.openai"]
    assert all(layer_of(t) > layer_of("efficient_attention.kernels.m") for t in found)


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_import_paths_reexport_the_compat_modules(old):
    new = importlib.import_module(OLD_PATHS[old])
    shim = importlib.import_module(old)
    assert list(shim.__all__) == list(new.__all__)
    for name in new.__all__:
        assert getattr(shim, name) is getattr(new, name), f"{old}.{name} is not {OLD_PATHS[old]}.{name}"


# Defined twice on purpose: the command-line entry points, and the reference backend of the kernel ops
# (kernels.reference implements the op that kernels.ops dispatches).
SAME_NAME_ALLOWED = {
    "main": {"efficient_attention.__main__", "efficient_attention.benchmark.cli"},
    "sliding_window_attention": {"efficient_attention.kernels.ops", "efficient_attention.kernels.reference"},
    "block_sparse_attention": {"efficient_attention.kernels.ops", "efficient_attention.kernels.reference"},
}


def test_one_definition_per_public_name():
    defined: Dict[str, Set[str]] = {}
    for module, path in MODULES.items():
        if not module.startswith("efficient_attention"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                defined.setdefault(node.name, set()).add(module)
    twice = {
        name: sorted(mods)
        for name, mods in defined.items()
        if len(mods) > 1 and not mods <= SAME_NAME_ALLOWED.get(name, set())
    }
    assert not twice, f"public names defined in several modules (give each thing one name): {twice}"


@pytest.mark.parametrize(
    "old, new",
    [("block_sparse_attention", "block_layout_attention"), ("landmark_attention", "landmark_token_attention")],
)
@pytest.mark.parametrize("package", ["efficient_attention", "efficient_attention.sparse"])
def test_renamed_functionals_keep_their_old_name_with_a_warning(package, old, new):
    module = importlib.import_module(package)
    with pytest.warns(DeprecationWarning, match=f"{package}.{old} is now {package}.{new}"):
        assert getattr(module, old) is getattr(module, new)
    assert old not in module.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name
