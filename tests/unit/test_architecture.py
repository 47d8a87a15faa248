"""The package's shape (README, "Architecture"): imports run one way, bottom to top, with no
cycles; no DeepSpeed below the checkpoint layer; modes reached only through the registry.

Every `import` in gptscale/ counts, including those inside functions: a lazy import still
ties the two modules together."""
import ast
import pathlib

import pytest

import gptscale
from gptscale import modes

PACKAGE = pathlib.Path(gptscale.__file__).parent

# Bottom to top. A module may import modules of its own layer and of the layers below.
LAYERS = [
    ("errors", "faults", "atomic", "safe_yaml", "typed", "presets", "modes", "config", "ds_templates"),
    ("ds_import", "launch"),
    ("parallel",),
    ("model",),
    ("data",),
    ("convert",),
    ("scaling",),
    ("checkpoint",),
    ("runtime",),
    ("train", "plot", "testing"),
    ("cli",),
]
LAYER_OF = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}
NO_DEEPSPEED = ("errors", "atomic", "safe_yaml", "typed", "presets", "modes", "config", "ds_templates", "launch", "parallel", "model", "data", "convert",
                "scaling")
NO_TORCH = ("errors", "safe_yaml", "typed", "presets", "modes", "config", "ds_templates")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports (gptscale modules as full names, others as their top package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            if node.module == "gptscale" or node.module.startswith("gptscale."):
                # `from gptscale import modes` imports the module gptscale.modes
                found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return found


def _is_module(name: str) -> bool:
    relative = pathlib.Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _ours(module: str) -> bool:
    return module.startswith("gptscale.") and module in GRAPH


def test_every_module_sits_in_a_layer():
    assert {_room(m) for m in GRAPH if m != "gptscale"} <= set(LAYER_OF)


def test_imports_run_one_way():
    upward = [f"{m} -> {i}" for m, imports in GRAPH.items() for i in imports
              if m != "gptscale" and _ours(i) and LAYER_OF[_room(i)] > LAYER_OF[_room(m)]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = {m: {i for i in imports if _ours(i) and i != m} for m, imports in GRAPH.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("room", NO_DEEPSPEED)
def test_the_lower_layers_never_touch_deepspeed(room):
    bad = [f"{m} -> {i}" for m, imports in GRAPH.items() if _room(m) == room for i in imports
           if i == "deepspeed" or i.startswith("deepspeed.") or i == "gptscale.ds_import"]
    assert not bad, bad


@pytest.mark.parametrize("room", NO_TORCH)
def test_config_and_the_registry_never_import_torch(room):
    bad = [f"{m} -> {i}" for m, imports in GRAPH.items() if _room(m) == room for i in imports
           if i == "torch" or i.startswith("torch.")]
    assert not bad, bad


def test_scaling_imports_no_distributed_code():
    bad = [f"{m} -> {i}" for m, imports in GRAPH.items() if _room(m) == "scaling" for i in imports
           if i.startswith(("torch.distributed", "deepspeed", "gptscale.runtime", "gptscale.launch"))]
    assert not bad, bad


def _mode_units() -> dict[str, str]:
    """mode name -> the module, or the package, that implements it."""
    units = {}
    for name in modes.names()[1:]:
        module = modes.by_name(name).runtime.partition(":")[0]
        if not module.startswith("gptscale."):
            continue  # a mode a test registered
        parent = module.rpartition(".")[0]
        units[name] = module if parent == "gptscale.runtime" else parent
    return units


def _unit_of(module: str, units: dict[str, str]) -> str | None:
    return next((mode for mode, unit in units.items() if module == unit or module.startswith(unit + ".")), None)


def test_modes_are_reached_only_through_the_registry():
    """No mode imports another; nothing outside a mode imports it (the loop, the checkpoint
    reader and the config ask gptscale.modes, and runtime.base imports a mode by its name)."""
    units = _mode_units()
    assert set(units) == {"zero3", "pipe", "pipe_zero3"}
    bad = []
    for module, imports in GRAPH.items():
        mine = _unit_of(module, units)
        for imported in imports:
            theirs = _unit_of(imported, units)
            if theirs is not None and theirs != mine:
                bad.append(f"{module} -> {imported}")
    assert not bad, bad


def test_no_module_but_the_registry_switches_on_a_mode_name():
    names = set(modes.names()[1:])
    bad = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "modes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            constants = []
            if isinstance(node, ast.Compare):
                constants = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            elif isinstance(node, ast.Dict):
                constants = [k for k in node.keys if isinstance(k, ast.Constant)]
            bad += [f"{path.relative_to(PACKAGE)}:{c.lineno} {c.value!r}" for c in constants if c.value in names]
    assert not bad, bad
