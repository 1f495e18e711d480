"""The package's imports run one way: down the layers of effitrain/layers.py, with no circles (docs/architecture.md,
"Layers").  Read with ``ast``, imports inside functions included: nothing is imported to check it."""

from __future__ import annotations

import textwrap
from pathlib import Path

from effitrain import layers
from effitrain.layers import Layer

REPO = Path(__file__).resolve().parents[1]


def test_the_package_imports_only_downward_without_circles():
    found = layers.problems()
    assert not found, "the import layers are broken:\n" + "\n".join(found)


def test_the_architecture_doc_shows_the_layer_table_of_effitrain_layers():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert layers.TABLE_START in doc and layers.TABLE_END in doc
    assert layers.with_table(doc) == doc, \
        "docs/architecture.md's layer table differs from effitrain/layers.py: run " \
        "`python -m effitrain.layers --write docs/architecture.md`"


# A small package made on disk, to show the check fails where it should and names the files.
TOY_LAYERS = (
    Layer("low", ("", "base", "util"), "the ground"),
    Layer("mid", ("shapes",), "the middle"),
    Layer("top", ("app", "shapes.cli"), "the top"),
)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "toy"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _problems(root: Path) -> list[str]:
    return layers.problems(root, TOY_LAYERS, package="toy")


def test_a_clean_package_has_no_problems(tmp_path):
    root = _package(tmp_path, {
        "base.py": "import os\n",
        "util.py": "from toy import base\n",
        "shapes/__init__.py": "",
        "shapes/square.py": "from toy.util import base\nfrom . import circle\n",
        "shapes/circle.py": "from ..base import os\n",
        "shapes/cli.py": "from toy.shapes import square\n",
        "app.py": "import toy.shapes.cli\n",
    })
    assert _problems(root) == []


def test_an_upward_import_inside_a_function_is_named_with_its_file_and_line(tmp_path):
    root = _package(tmp_path, {
        "base.py": "def build():\n    from toy.app import main\n    return main\n",
        "app.py": "from toy.base import build\n",
    })
    found = _problems(root)
    assert any(line.startswith("toy/base.py:2: a deferred import of toy.app runs up from layer 'low' to layer "
                               "'top'") for line in found), found


def test_a_module_level_upward_import_is_named(tmp_path):
    root = _package(tmp_path, {
        "util.py": "from toy.shapes import square\n",
        "shapes/__init__.py": "",
        "shapes/square.py": "X = 1\n",
    })
    assert _problems(root) == ["toy/util.py:1: an import of toy.shapes.square runs up from layer 'low' to layer "
                               "'mid'"]


def test_a_module_named_on_its_own_sits_in_its_own_layer(tmp_path):
    # shapes.cli is in 'top' although its package is in 'mid': importing it from shapes runs up
    root = _package(tmp_path, {
        "shapes/__init__.py": "",
        "shapes/square.py": "def f():\n    from toy.shapes import cli\n",
        "shapes/cli.py": "",
    })
    assert _problems(root) == ["toy/shapes/square.py:2: a deferred import of toy.shapes.cli runs up from layer "
                               "'mid' to layer 'top'"]


def test_a_circle_within_one_layer_is_named_with_all_its_files(tmp_path):
    root = _package(tmp_path, {
        "shapes/__init__.py": "",
        "shapes/a.py": "from toy.shapes import b\n",
        "shapes/b.py": "def f():\n    from .c import g\n",       # relative, and deferred: still an edge
        "shapes/c.py": "import toy.shapes.a\n",
    })
    assert _problems(root) == ["import circle of 3 modules: toy/shapes/a.py, toy/shapes/b.py, toy/shapes/c.py"]


def test_a_module_in_no_layer_is_named(tmp_path):
    root = _package(tmp_path, {"extras/__init__.py": "", "extras/thing.py": ""})
    assert _problems(root) == [
        "toy/extras/__init__.py: toy.extras is in no layer; add it to effitrain/layers.py's LAYERS",
        "toy/extras/thing.py: toy.extras.thing is in no layer; add it to effitrain/layers.py's LAYERS",
    ]


def test_the_doc_table_is_rewritten_from_the_definition(tmp_path):
    doc = tmp_path / "architecture.md"
    doc.write_text(f"# A\n\n{layers.TABLE_START}| old |\n{layers.TABLE_END}after\n")
    assert layers.main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text == f"# A\n\n{layers.TABLE_START}{layers.markdown_table()}{layers.TABLE_END}after\n"
    assert "| cli | `cli`" in text and "| ground | `__init__`, `errors`" in text
