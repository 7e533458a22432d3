"""The code base stays one a contributor can hold in mind: no import cycle, a short training step,
transformers workarounds that match the pinned version, no citations of documents users lack."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mpo"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``mpo`` module -> the ``mpo`` modules it imports, at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = import_graph()
    assert "mpo.trainer" in graph["mpo.run"]  # the graph sees imports inside functions
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The check itself finds a cycle when there is one.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_training_step_fits_on_one_screen():
    from mpo.trainer import MPOTrainer

    lines = inspect.getsource(MPOTrainer.compute_loss).splitlines()
    assert len(lines) <= 40, len(lines)


def test_workarounds_match_the_pinned_transformers():
    """The Trainer methods MPOTrainer overrides (its module docstring lists why) still exist with
    the signatures they were written against; a transformers upgrade fails here first."""
    import transformers
    from transformers import Trainer

    from mpo.trainer import TESTED_TRANSFORMERS

    assert transformers.__version__.startswith(TESTED_TRANSFORMERS), transformers.__version__
    expected = {
        "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
        "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        "prediction_step": ["self", "model", "inputs", "prediction_loss_only", "ignore_keys"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
        "_prepare_inputs": ["self", "inputs"],
        "floating_point_ops": ["self", "inputs"],
        "_track_num_input_tokens": ["self", "inputs"],
        "_get_train_sampler": ["self", "train_dataset"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, name
    source = inspect.getsource(Trainer)
    assert "self.loss_is_scaled_for_ga" in source and "self.model_accepts_loss_kwargs" in source


def test_no_citation_of_documents_users_do_not_have():
    pattern = re.compile(r"facts §|internvl-facts|shared/docs")
    folders = ("mpo", "tests", "scripts", "configs", "docs", "train", "data")
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile"]
    files += [
        p
        for d in folders
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".md", ".yaml", ".sh", ".json")
    ]
    offenders = [
        str(p.relative_to(ROOT)) for p in files if p.name != "test_house.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
