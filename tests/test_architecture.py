"""The package's shape, read from its source with `ast`: the stages depend only on the core, nothing imports in a
cycle, no module imports another's private names, and no transformers deprecation is triggered by rora's calls."""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "rora"
# The core every stage may use; it imports no stage.
CORE = {"rora", "rora.errors", "rora.config", "rora.registry", "rora.artifacts", "rora.architecture", "rora.numerics",
        "rora.models", "rora.measure", "rora.sources", "rora.sources.gguf", "rora.sources.llm_pruner",
        "rora.sources.text", "rora.sources.torch_pruning", "rora.writing"}
STAGES = ("rora.pruning", "rora.reconstruction", "rora.recovery", "rora.evaluation", "rora.deployment")
# Composition: rora/pipelines/ (the pipeline, its summary), the CLI; they may import anything.
TOP = {"rora.pipelines", "rora.pipelines.run", "rora.pipelines.summary", "rora.cli", "rora.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported rora module, imported names) for every import in the file, function-level ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("rora"):
                found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("rora")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _imports(path):
            # `from . import llamacpp` names a module; `from .x import y` a module x
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    edges.add(candidate)
                    break
        graph[name] = edges
    return graph


def _layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module in TOP:
        return "top"
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return stage
    raise AssertionError(f"{module} belongs to no layer: add it to CORE, STAGES or TOP in this test")


def test_every_module_has_a_layer_and_stages_depend_only_on_the_core():
    wrong = []
    for module, edges in _graph().items():
        layer = _layer(module)
        for target in edges:
            to = _layer(target)
            if layer == "core" and to != "core":
                wrong.append(f"core module {module} imports {target}")
            elif layer in STAGES and to not in ("core", layer):
                wrong.append(f"stage module {module} imports {target} of another stage")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_private_name_is_imported_across_modules():
    private = [f"{_module_name(p)} imports {n} from {target}"
               for p in PACKAGE.rglob("*.py") for target, names in _imports(p)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


def test_scoring_and_generation_trigger_no_transformers_deprecation(tokenizer):
    from conftest import make_model
    from peft import LoraConfig, get_peft_model

    from rora.evaluation.generate import generate_responses
    from rora.evaluation.score import loglikelihoods
    from rora.evaluation.tasks import eval_prompt
    from rora.models import peft_wrapping

    torch.manual_seed(0)
    model = make_model("llama", heads=4, kv_heads=2)
    prompts = [eval_prompt("is the sky blue?"), eval_prompt("is grass green?")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loglikelihoods(model, tokenizer, [(p, ("true", "false")) for p in prompts])
        generate_responses(model, tokenizer, prompts, batch_size=2, max_new_tokens=4)
        with peft_wrapping():
            get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and "deprecat" in str(w.message)]
    assert not deprecations, deprecations


def test_public_api_names_survive_importing_every_module():
    # A subpackage named like an API function (rora/export/ beside rora.export()) would replace the function
    # with the module as soon as it is imported; that is why the export stage lives in rora/deployment/.
    import importlib

    import rora

    for module in _graph():
        if module != "rora.__main__":
            importlib.import_module(module)
    for name in rora.__all__:
        assert callable(getattr(rora, name)), name


def _submodule(package, name: str) -> bool:
    import importlib.util

    return hasattr(package, "__path__") and importlib.util.find_spec(f"{package.__name__}.{name}") is not None


def test_benchmarks_import_only_names_that_exist():
    # The benchmark scripts import inside their functions, so a renamed or moved name breaks them only when run
    # (for hours); check every `from rora... import name` they hold against the package as it is.
    import importlib

    missing = []
    for script in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rora"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not _submodule(module, a.name)]
    assert not missing, "\n".join(missing)
