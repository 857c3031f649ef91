#!/usr/bin/env python
"""The demo as a user runs it, at full speed and on a 2x slower machine (issue 30).

Runs `python -m align_detr_hf.demo` with its defaults (the 480 s training budget included) twice: with all cores
(torch's default threads) and with one torch thread (`--threads 1`, which on 2 cores about halves the speed: a
slower machine). The demo times its first steps and fits its schedule to the budget; this script records the steps it
chose, whether it completed them, its COCO mAP and the wall time, the machine's load average before and after, and
writes:
- the table to BENCHMARKS.md between `<!-- demo:start -->` and `<!-- demo:end -->`;
- `src/align_detr_hf/assets/demo_reference.json`, the measured results the demo prints beside its own (the one with
  the closest step count).

    python benchmarks/bench_demo.py                     # ~20 min on 2 cores
    python benchmarks/bench_demo.py --report_only       # re-render from OUTPUT_DIR/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "src" / "align_detr_hf" / "assets" / "demo_reference.json"
SETTINGS = {"full speed": 0, "one thread (2x slower)": 1}  # --threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="/tmp/bench_demo", help="where the demo runs write")
    p.add_argument("--time_budget_s", type=float, default=None, help="default: the demo's")
    p.add_argument("--no_write", action="store_true", help="do not update BENCHMARKS.md and the demo's reference")
    p.add_argument("--report_only", action="store_true", help="re-render from OUTPUT_DIR/results.json")
    return p.parse_args(argv)


def run_demo(setting: str, threads: int, args) -> dict:
    out = Path(args.output_dir) / ("threads_%d" % threads)
    command = [sys.executable, "-m", "align_detr_hf.demo", "--output_dir", str(out), "--threads", str(threads)]
    if args.time_budget_s:
        command += ["--time_budget_s", str(args.time_budget_s)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    log = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    wall = time.perf_counter() - start
    if log.returncode:
        raise SystemExit(f"demo failed ({setting}):\n{log.stderr[-2000:]}")
    result = json.loads((out / "metrics.json").read_text())
    chosen = [line for line in log.stdout.splitlines() if "schedule for the" in line]
    return {
        "setting": setting, "threads": threads, "torch_threads": result["threads"], "steps": result["steps"],
        "schedule": result["schedule"], "completed_schedule": result["completed_schedule"],
        "map": round(result["metrics"]["map"], 3), "map_50": round(result["metrics"]["map_50"], 3),
        "train_seconds": result["train_seconds"], "wall_seconds": round(wall, 1),
        "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
        "chosen": chosen[0].split("] ", 1)[1] if chosen else "",
        "command": " ".join(["python", *command[1:]]),
    }


def render(results: list[dict], machine: dict) -> str:
    lines = [
        "## The demo at full speed and on a 2x slower machine",
        "",
        "Written by `benchmarks/bench_demo.py` (" + common.command_line() + "). The demo with its defaults (600 "
        "train / 100 val images of 128 px, the `from_scratch` recipe of 2000 steps, 480 s training budget), once "
        "with all cores and once with one torch thread. The demo times its first 10 steps and fits the schedule "
        "(steps, warm-up, lr drop at 80%) to the budget, re-fitting it every 10 steps from the time of the last 50. Machine: "
        f"{machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']}; shared with other jobs (load "
        "average in the table), so the step counts depend on the load at the time.",
        "",
        "| setting | torch threads | steps (of 2000) | schedule completed | COCO mAP | AP50 | training s | wall s "
        "| load before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['torch_threads']} | {r['steps']} | {'yes' if r['completed_schedule'] else 'no'} "
            f"| {r['map']:.3f} | {r['map_50']:.3f} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} "
            f"| {r['load_before']} / {r['load_after']} |"
        )
    lines += ["", "Schedules chosen:", ""]
    lines += [f"- {r['setting']}: {r['chosen']} — `{r['command']}`" for r in results]
    return "\n".join(lines)


def write_reference(results: list[dict]) -> None:
    current = json.loads(REFERENCE.read_text())
    kept = [r for r in current["results"] if "bench_demo" not in r.get("source", "")]
    new = [{"setting": f"{r['setting']}, {r['train_seconds']:.0f} s of training", "steps": r["steps"],
            "map": r["map"], "source": "benchmarks/bench_demo.py"} for r in results]
    current["results"] = kept + new
    current["written_by"] = "benchmarks/bench_demo.py (and bench_recipes.py's full-schedule demo row)"
    REFERENCE.write_text(json.dumps(current, indent=2) + "\n")


def main(argv=None):
    args = parse_args(argv)
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    if args.report_only:
        saved = json.loads(path.read_text())
        results, machine = saved["results"], saved["machine"]
    else:
        machine = common.machine_info()
        results = []
        for setting, threads in SETTINGS.items():  # one at a time: they would slow each other down
            results.append(run_demo(setting, threads, args))
            print(json.dumps(results[-1]), flush=True)
            path.write_text(json.dumps({"results": results, "machine": machine}, indent=2))
    text = render(results, machine)
    print(text)
    if not args.no_write:
        common.write_section("demo", text)
        write_reference(results)


if __name__ == "__main__":
    main()
