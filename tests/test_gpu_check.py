"""benchmarks/gpu_check.py in its dry run (CPU, tiny shapes, the Triton kernel in Triton's interpreter), as CI runs
it: every section runs and reports JSON with real checks (kernel and hub-layer errors within tolerance, the fallback
without triton clean, the compiled model without graph break), and nothing it prints is presented as a GPU figure.

The dry run (once per module) takes ~40 s of CPU, in two worker processes side by side: 100-130 s of wall time
measured on 2 cores at load average 10-12; its export section (~50 s of CPU, most of it the ONNX export) runs in the
slow test.
"""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402

needs_tools = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("triton", "kernels")),
    reason="the dry run needs triton (its interpreter) and kernels: pip install -e '.[dev]'",
)


def run_dry(tmp_path, *args):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nsomeone's figures\n")
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(report_path), "--output", str(benchmarks), *args],
        capture_output=True, text=True, cwd=REPO, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(report_path.read_text()), result.stdout, benchmarks


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return run_dry(tmp_path_factory.mktemp("gpu_check"), "--skip", "export")


def table_rows(markdown):
    """{section title: (headers, [row cells])} of the Markdown tables."""
    tables, title, lines = {}, None, markdown.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("### "):
            title = line[4:]
        elif line.startswith("| ") and index + 1 < len(lines) and lines[index + 1].startswith("|---"):
            tables[title] = (_cells(line), [])
        elif line.startswith("| ") and not line.startswith("|---") and title in tables:
            tables[title][1].append(_cells(line))
    return tables


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@needs_tools
def test_dry_run_checks_every_section_on_cpu(dry_run):
    report, _, _ = dry_run
    assert report["dry_run"] is True and report["gpu_figures"] is False
    assert report["skipped"] == ["export"]
    sections = report["sections"]
    assert list(sections) == ["kernel", "hub_kernel", "inference", "training", "compile"]
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        assert section["device"] == "cpu" and section["dry_run"] is True, name

    kernel = sections["kernel"]["rows"]
    assert [(r["shape"].split()[0], r["dtype"]) for r in kernel] == [
        (place, dtype) for place in ("encoder", "decoder") for dtype in ("fp32", "bf16", "fp16")]
    assert all(r["passed"] for r in kernel), kernel
    assert max(r["fwd_max_err"] for r in kernel if r["dtype"] == "fp32") < 1e-5
    fallback = sections["kernel"]["fallback_without_triton"]
    assert fallback["ok"] and fallback["implementation"] == "pytorch" and fallback["max_err"] == 0.0, fallback

    hub = sections["hub_kernel"]["rows"]
    assert [r["dtype"] for r in hub] == ["fp32", "fp32", "bf16", "fp16"]
    assert all(r["passed"] and r["implementation"] == "triton" for r in hub), hub  # the kernel, in the interpreter
    assert hub[0]["noise_ratio"] <= 4.0

    inference = sections["inference"]["rows"]
    assert len(inference) == 12 and all(r["ms_per_image"] > 0 and r["peak_mib"] >= 0 for r in inference)
    assert {r["model"] for r in inference} == {"ours", "theirs", "theirs+kernel"}
    assert all(r["vs_theirs"] == 1.0 for r in inference if r["model"] == "theirs")
    training = sections["training"]["rows"]
    assert [r["model"] for r in training] == ["ours", "theirs", "theirs+kernel"]
    assert all(r["images_per_s"] > 0 and r["cuda_syncs"] is None and r["sync_like_calls"] > 0 for r in training)
    (compiled,) = sections["compile"]["rows"]
    assert compiled["graph_breaks"] == 0 and compiled["backend"] == "aot_eager"
    assert compiled["max_logit_diff"] < 1e-4 and compiled["max_box_diff"] < 1e-5


@needs_tools
def test_dry_run_presents_no_figure_as_a_gpu_measurement(dry_run):
    report, markdown, benchmarks = dry_run
    assert benchmarks.read_text() == "# Benchmarks\n\nsomeone's figures\n"  # written only with --write-pending
    assert gpu_check.GPU_MARKER not in markdown and "**Every GPU figure below is pending**" in markdown
    tables = table_rows(markdown)
    for name, (title, plan, labels, figures) in gpu_check.TABLES.items():
        if name not in report["sections"]:
            assert title not in tables
            continue
        headers, rows = tables[title]
        assert headers == [header for _, header, _ in labels + figures]
        assert len(rows) == len(plan(False))  # the GPU cases, not the tiny ones that ran
        for row in rows:
            assert row[len(labels):] == [gpu_check.PENDING] * len(figures), (title, row)
    # the labels describe the GPU cases
    assert any("800x1333" in cell for _, rows in tables.values() for row in rows for cell in row)


@needs_tools
def test_a_gpu_report_renders_its_figures_and_a_dry_run_never_replaces_them(dry_run, tmp_path):
    report, _, _ = dry_run
    gpu_report = copy.deepcopy(report)  # rendering only: the dry run's numbers stand in for a GPU run's
    gpu_report.update(dry_run=False, gpu_figures=True)
    gpu_report["machine"].update(gpu="Test GPU", cuda="12.8")
    markdown = gpu_check.render(gpu_report)
    assert gpu_check.GPU_MARKER in markdown and "Measured on Test GPU" in markdown
    tables = table_rows(markdown)
    headers, rows = tables[gpu_check.TABLES["inference"][0]]
    assert len(rows) == 12 and gpu_check.PENDING not in {cell for row in rows for cell in row}
    assert "clean fallback" in markdown

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    pending = gpu_check.render(report)
    gpu_check.write_benchmarks(path, pending, gpu_figures=False)  # no GPU figures yet: the pending table goes in
    assert "**Every GPU figure below is pending**" in path.read_text()
    gpu_check.write_benchmarks(path, markdown, gpu_figures=True)
    with pytest.raises(ValueError, match="holds figures of a GPU run; a dry run does not replace them"):
        gpu_check.write_benchmarks(path, pending, gpu_figures=False)
    assert "Measured on Test GPU" in path.read_text()
    gpu_check.write_benchmarks(path, pending, gpu_figures=False, replace=True)  # asked for: replaced
    text = path.read_text()
    assert "Measured on Test GPU" not in text and "<!-- other:start -->\nkept\n<!-- other:end -->" in text

    # a GPU run's JSON brought back from the GPU machine: rendered and written again without measuring
    saved = tmp_path / "gpu_check.json"
    saved.write_text(json.dumps(gpu_report))
    assert gpu_check.main(["--from-json", str(saved), "--output", str(path)]) == 0
    assert "Measured on Test GPU" in path.read_text()
    dry_saved = tmp_path / "dry.json"
    dry_saved.write_text(json.dumps(report))
    assert gpu_check.main(["--from-json", str(dry_saved), "--output", str(path), "--write-pending"]) == 2
    assert "Measured on Test GPU" in path.read_text()  # refused, in one line


def test_a_failing_section_is_reported_and_the_others_still_render():
    report = {
        "dry_run": False, "gpu_figures": True, "command": "python benchmarks/gpu_check.py", "started": "now",
        "total_s": 1.0, "skipped": [],
        "machine": {"gpu": "Test GPU", "cuda": "12.8", "torch": "x", "triton": "x", "transformers": "x",
                    "kernels": "x", "onnxruntime": "x", "git_commit": "x"},
        "sections": {
            "export": {"status": "error", "error": "RuntimeError: onnxruntime 1.32.0 has no CUDAExecutionProvider"},
            "compile": {"status": "ok", "rows": [{**gpu_check.compile_cases(False)[0], "graph_breaks": 0,
                                                   "compile_s": 61.0, "eager_ms": 40.0, "compiled_ms": 30.0,
                                                   "speedup": 4 / 3, "max_logit_diff": 1e-5, "max_box_diff": 1e-6}]},
        },
    }
    markdown = gpu_check.render(report)
    assert "**Section failed** (GPU run): `RuntimeError: onnxruntime 1.32.0 has no CUDAExecutionProvider`" in markdown
    assert "| Align-DETR (ours) | fp32 | 1 | 800x1333 | inductor | 0 | 61.0 | 40.0 | 30.0 | 1.33x |" in markdown


def test_without_a_gpu_the_real_run_refuses_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "machine", lambda: {"gpu": None})
    assert gpu_check.main(["--sections", "kernel"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpu_check: no CUDA device here; run with --dry-run to check the script on CPU")


@needs_tools
@pytest.mark.slow
def test_dry_run_export_section(tmp_path):
    """The fp16 ONNX export of a tiny model, run by ONNX Runtime's CPU provider on the fixture images (~45 s of CPU
    for the export)."""
    pytest.importorskip("onnxruntime")
    report, markdown, _ = run_dry(tmp_path, "--sections", "export")
    section = report["sections"]["export"]
    assert section["status"] == "ok", section.get("traceback")
    onnx_row, eager_row = section["rows"]
    assert onnx_row["queries_within_tol"] >= 0.9 and eager_row["vs_eager"] == 1.0
    assert "| ONNX Runtime CUDA (fp16 export) | fixture 2x3x160x224 | pending |" in markdown
