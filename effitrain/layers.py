"""The layers of the package and the check that its imports run only downward.

``LAYERS`` is the one definition: ``tests/test_layers.py`` checks the package against it and
``docs/architecture.md`` shows it (``python -m effitrain.layers --write DOC`` rewrites the doc's table from it; the
test fails while the two differ).

The rule: a module imports only from modules of its own layer or of the layers below, and no modules import each
other in a circle (directly or round a loop).  Every import counts, the ones inside functions too: an import
deferred to keep start-up fast is still a dependency.  A module belongs to the layer of the longest entry of
``LAYERS`` that names it or a package above it; a module no entry names is an error, so a new package is placed
deliberately.  Torch-free, standard library only.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

PACKAGE = "effitrain"


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]  # dotted names under PACKAGE: packages (everything in them) or single modules
    role: str


#: From the ground up.  Where a module of a package sits in another layer than its package (a contract that lower
#: layers implement, a verb that drives the layers below), it is named on its own line.
LAYERS: tuple[Layer, ...] = (
    Layer("ground", ("", "errors", "registry", "paths", "fsutil", "console", "linalg", "run_layout", "cluster.slurm_env", "layers",
                     "generation.http"),
          "errors, the registry, paths and the console: what every file may use; generation.http speaks the "
          "OpenAI-compatible protocol with the standard library (check probes an endpoint with it)"),
    Layer("data", ("data",),
          "data sources and formats: the demo corpus, readers, the tokenizer, packing and the layout of its rows; "
          "the sharded data engine (datatrove steps, token shards), which takes its executor as plain settings"),
    Layer("config", ("config", "configs", "timeline", "optim.lr_curves", "curriculum.pacing"),
          "the run's description: block schemas, validation, rules, composing, stages, and the curves of progress "
          "the schemas evaluate (lr, pacing); torch-free"),
    Layer("contracts", ("engine.events", "engine.state"),
          "what the engine calls and the blocks implement: hooks and the state they see"),
    Layer("blocks", ("models", "peft", "optim", "precision", "parallel", "objectives", "methods", "curriculum",
                     "selection", "loggers", "data.splits", "generation"),
          "the building blocks a run is made of, built by the registry from their schemas; data.splits picks each "
          "format's row builder and rates segments for control tokens with a selection scorer; generation: the "
          "generator backends, the request cache and the rollouts"),
    Layer("engine", ("engine", "memory", "timeline_hooks"),
          "the DeepSpeed loop, checkpoints, run directories, metrics"),
    Layer("run", ("train", "export", "evaluation", "prepare"),
          "one run: builds the blocks, runs the engine, exports and evaluates its model; prepare builds its data "
          "alone (the data stage the run itself calls)"),
    Layer("pipeline", ("pipeline", "selection.stage", "generation.synthesis", "cluster", "cluster.job", "cluster.launcher", "cluster.manifest"),
          "several runs: stages, selection as a stage of its own, the synthesis stage (a dataset made with a "
          "generator), cluster jobs and their sweep manifests"),
    Layer("cli", ("cli", "plan", "planner", "report"),
          "the verbs a user types"),
)


def layer_of(module: str, layers: tuple[Layer, ...] = LAYERS,
             package: str = PACKAGE) -> Optional[tuple[int, Layer]]:
    """``(rank, layer)`` of a dotted module name: the layer of its longest matching entry; None if none names it."""
    best: Optional[tuple[int, int, Layer]] = None
    for rank, layer in enumerate(layers):
        for entry in layer.modules:
            full = f"{package}.{entry}" if entry else package
            # the package's own __init__ ("") names itself only, not everything under it
            if module == full or (entry and module.startswith(full + ".")):
                if best is None or len(full) > best[0]:
                    best = (len(full), rank, layer)
    return None if best is None else (best[1], best[2])


@dataclass(frozen=True)
class Import:
    source: str      # the importing module
    target: str      # the imported module of the package
    path: Path       # the importing file
    line: int
    deferred: bool   # inside a function (or a class body): runs later, but is a dependency all the same


@dataclass
class Package:
    modules: dict[str, Path] = field(default_factory=dict)  # dotted name -> file
    imports: list[Import] = field(default_factory=list)


def read_package(root: Path, package: str = PACKAGE) -> Package:
    """Every module under ``root`` (the package's folder) and every import of a module of the package, read with
    ``ast`` (nothing is imported)."""
    found = Package()
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.modules[".".join(parts)] = path
    for module, path in found.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        seen: set[tuple[str, int]] = set()  # `from a import b, c` with both in module a: one import
        for node, deferred in _imports(tree):
            for target in _targets(node, module, is_package, package, found.modules):
                if target != module and (target, node.lineno) not in seen:
                    seen.add((target, node.lineno))
                    found.imports.append(Import(module, target, path, node.lineno, deferred))
    return found


def _imports(tree: ast.AST) -> Iterable[tuple[ast.AST, bool]]:
    """Every import statement with whether it sits inside a function or class body."""
    def walk(node: ast.AST, deferred: bool) -> Iterable[tuple[ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            yield from walk(child, inner)
    return walk(tree, False)


def _targets(node: ast.AST, module: str, is_package: bool, package: str, modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement loads (``from a import b`` loads ``a.b`` when that is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
    out = []
    for name in names:
        if name != package and not name.startswith(package + "."):
            continue
        while name not in modules and "." in name:  # `from pkg.mod import function`: the module
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def unplaced(found: Package, layers: tuple[Layer, ...] = LAYERS, package: str = PACKAGE) -> list[str]:
    """Modules that no layer names."""
    return sorted(m for m in found.modules if layer_of(m, layers, package) is None)


def upward_imports(found: Package, layers: tuple[Layer, ...] = LAYERS,
                   package: str = PACKAGE) -> list[tuple[Import, Layer, Layer]]:
    """``(import, its file's layer, the imported module's layer)`` for every import that runs up."""
    out = []
    for imp in found.imports:
        source, target = layer_of(imp.source, layers, package), layer_of(imp.target, layers, package)
        if source is not None and target is not None and target[0] > source[0]:
            out.append((imp, source[1], target[1]))
    return out


def circles(found: Package) -> list[list[str]]:
    """The import circles: each a list of modules that import one another round a loop (Tarjan's strongly
    connected components of more than one module), sorted."""
    edges: dict[str, set[str]] = {m: set() for m in found.modules}
    for imp in found.imports:
        edges[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(start: str) -> None:  # iterative, so a deep package cannot exhaust Python's recursion limit
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return sorted(out)


def problems(root: Optional[Path] = None, layers: tuple[Layer, ...] = LAYERS, package: str = PACKAGE) -> list[str]:
    """One line per broken rule, naming the files; empty when the package imports only downward."""
    root = root or Path(__file__).resolve().parent
    found = read_package(root, package)
    base = root.parent
    lines = [f"{found.modules[m].relative_to(base)}: {m} is in no layer; add it to effitrain/layers.py's LAYERS"
             for m in unplaced(found, layers, package)]
    for imp, source, target in upward_imports(found, layers, package):
        how = "a deferred import" if imp.deferred else "an import"
        lines.append(f"{imp.path.relative_to(base)}:{imp.line}: {how} of {imp.target} runs up from layer "
                     f"'{source.name}' to layer '{target.name}'")
    for circle in circles(found):
        files = ", ".join(str(found.modules[m].relative_to(base)) for m in circle)
        lines.append(f"import circle of {len(circle)} modules: {files}")
    return lines


def markdown_table(layers: tuple[Layer, ...] = LAYERS) -> str:
    """The layer table of docs/architecture.md, top layer first (as the picture draws them)."""
    rows = ["| layer | modules (`effitrain.`…) | role |", "|---|---|---|"]
    for layer in reversed(layers):
        names = ", ".join(f"`{m}`" if m else "`__init__`" for m in layer.modules)
        rows.append(f"| {layer.name} | {names} | {layer.role} |")
    return "\n".join(rows) + "\n"


TABLE_START = "<!-- layers: generated by `python -m effitrain.layers --write docs/architecture.md` -->\n"
TABLE_END = "<!-- /layers -->\n"


def with_table(doc: str, layers: tuple[Layer, ...] = LAYERS) -> str:
    """``doc`` with the text between the markers replaced by the current table."""
    start, end = doc.index(TABLE_START) + len(TABLE_START), doc.index(TABLE_END)
    return doc[:start] + markdown_table(layers) + doc[end:]


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--write"] and len(args) == 2:
        doc = Path(args[1])
        doc.write_text(with_table(doc.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    found = problems()
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
