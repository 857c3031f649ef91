"""torch.profiler tables of our (and optionally their) inference and training step on CPU; writes
benchmarks/profile_cpu.md.

    python benchmarks/profile_cpu.py                       # ours, 512x512, inference b1 + training step b2
    python benchmarks/profile_cpu.py --models ours theirs --size 800 1333 --top 40
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from align_detr_hf.file_io import claim_output, owned_file  # noqa: E402

WRITER = "benchmarks/profile_cpu.py"  # how its output is recorded in its folder's manifest (file_io)
DEFAULT_OUTPUT = Path(__file__).parent / "profile_cpu.md"


def profile_model(name, mode, batch, height, width, top, sort_by, by_shape=False):
    torch.manual_seed(0)
    model = common.build_model(name)
    pixels, mask, labels = common.make_batch(batch, height, width, "cpu")
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(pixels, pixel_mask=mask)

    else:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with record_function("## forward + loss"):
                out = model(pixels, pixel_mask=mask, labels=labels)
            with record_function("## backward"):
                out.loss.backward()
            with record_function("## optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        step()
    wall = time.perf_counter() - start
    averages = prof.key_averages(group_by_input_shape=by_shape)
    table = averages.table(sort_by=sort_by, row_limit=top, max_name_column_width=60, max_shapes_column_width=70)
    return wall, table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ours"],
                        choices=["ours", "ours-frozen-backbone", "ours-frozen-backbone-no-dn", "theirs"])
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--by-shape", action="store_true", help="one row per op and input shapes")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sort-by", default="self_cpu_time_total")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--overwrite", action="store_true", help="replace an --output file this script did not write")
    args = parser.parse_args()
    # the repository's own profile_cpu.md is this script's to rewrite; any other file follows the ownership rule
    overwrite = args.overwrite or Path(args.output).resolve() == DEFAULT_OUTPUT.resolve()
    claim_output(args.output, WRITER, overwrite=overwrite)  # before the (minutes of) profiling
    height, width = args.size
    info = common.machine_info()
    lines = [
        "# CPU profile",
        "",
        "Written by `benchmarks/profile_cpu.py` (re-run it; do not edit by hand). One warmed-up step under "
        f"torch.profiler, sorted by {args.sort_by}. Profiling adds overhead: compare with BENCHMARKS.md for times.",
        "",
        f"    {common.command_line()}",
        "",
        ", ".join(f"{k}: {v}" for k, v in info.items()),
        "",
    ]
    for name in args.models:
        for mode, batch in (("infer", args.infer_batch), ("train", args.train_batch)):
            if mode not in args.modes:
                continue
            wall, table = profile_model(name, mode, batch, height, width, args.top, args.sort_by, args.by_shape)
            print(f"{name} {mode} b{batch}: {wall:.2f}s under the profiler", flush=True)
            lines += [f"## {name}, {mode}, batch {batch}, {height}x{width} ({wall:.2f} s under the profiler)", "",
                      "```", table, "```", ""]
    with owned_file(args.output, WRITER, overwrite=overwrite) as temp:
        temp.write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    common.run_main(main)
