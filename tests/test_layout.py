"""The package's module graph, read from the relative imports of `src/align_detr_hf/*.py` (nothing is imported)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "align_detr_hf"


def relative_imports(with_function_level: bool) -> dict[str, set[str]]:
    """Module name -> the package modules it imports (`from .x import` / `from . import x`); module-level imports
    only, or also those inside functions."""
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = ast.walk(tree) if with_function_level else tree.body
        targets = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                targets.update(n.split(".")[0] for n in names if n.split(".")[0] in modules)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (strongly connected components of 2 or more,
    or a module importing itself), each sorted."""
    reach = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        reach[start] = seen
    groups = {tuple(sorted({a} | {b for b in graph if b in reach[a] and a in reach[b]}))
              for a in graph if a in reach[a]}
    return sorted(list(group) for group in groups)


def test_the_graph_is_read():
    graph = relative_imports(with_function_level=False)
    assert graph["modeling_align_detr"] >= {"loss_align_detr", "targets_align_detr", "denoising_align_detr"}
    assert "export_align_detr" not in graph["cli"]  # imported inside a function only
    assert "export_align_detr" in relative_imports(with_function_level=True)["cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == [["a", "b", "c"], ["e"]]


def test_no_import_cycle_at_module_level():
    assert cycles(relative_imports(with_function_level=False)) == []


def test_the_loss_modules_import_downwards_only():
    """targets <- matching <- loss <- adapters, modeling: the matcher and the target checks know nothing of the loss
    or the model."""
    graph = relative_imports(with_function_level=True)
    assert graph["targets_align_detr"] == set()
    assert graph["matching_align_detr"] <= {"box_ops", "targets_align_detr"}
    assert graph["loss_align_detr"] <= {"box_ops", "configuration_align_detr", "denoising_align_detr",
                                        "matching_align_detr", "targets_align_detr"}
    assert graph["loss_adapters"] <= {"loss_align_detr", "configuration_align_detr"}  # its options are checked by the config's rules


def test_the_small_preset_lives_beside_the_config():
    """design_next.md item 4: the demo and the recipes both take `small_config` from configuration_align_detr, so
    neither imports the other, even inside a function."""
    graph = relative_imports(with_function_level=True)
    assert "demo" not in graph["recipes"]
    assert not [group for group in cycles(graph) if {"demo", "recipes"} & set(group)]


def test_image_decoding_sits_below_the_image_processors():
    """design_next.md "next in line": pixels -> float RGB lives in image_io, which both processors, the pipeline and
    the data loaders import; image_io imports none of them."""
    graph = relative_imports(with_function_level=True)
    assert graph["image_io"] <= {"download"}
    assert "image_io" in graph["image_processing_align_detr"] and "image_io" in graph["image_processing_pil_align_detr"]


def test_the_processor_backends_share_a_base_module_and_import_no_circle():
    """Both backends subclass the rule in image_processing_base_align_detr; the tensor backend imports the PIL twin
    at module level (transformers then copies its file into saved folders), and the twin imports only the base."""
    graph = relative_imports(with_function_level=True)
    assert "image_processing_align_detr" not in graph["image_processing_pil_align_detr"]
    assert "image_processing_pil_align_detr" in relative_imports(with_function_level=False)["image_processing_align_detr"]
    backends = {"image_processing_align_detr", "image_processing_pil_align_detr", "image_processing_base_align_detr"}
    assert [group for group in cycles(graph) if backends & set(group)] == []


def test_cli_and_the_exporters_import_no_circle():
    """cli and export_align_detr share the model loading through `loading` (design_next.md item 4): no module of the
    command line or the export reaches itself, counting imports inside functions too."""
    graph = relative_imports(with_function_level=True)
    assert "cli" not in graph["export_align_detr"] and "export_align_detr" not in graph["loading"]
    involved = {"cli", "loading"} | {name for name in graph if name.startswith("export") or name == "quantize"}
    assert [group for group in cycles(graph) if involved & set(group)] == []


def test_no_import_cycle_counting_imports_inside_functions():
    assert cycles(relative_imports(with_function_level=True)) == []
