"""The `align-detr` command: `convert` (mmdetection checkpoint -> Hugging Face folder), `predict`, `demo`."""

import argparse
import sys


def _convert(args: argparse.Namespace) -> None:
    from .convert_align_detr import convert_checkpoint

    overrides = {}
    if args.num_denoising_queries is not None:
        overrides["num_denoising_queries"] = args.num_denoising_queries
    config = None
    if overrides:
        from .convert_align_detr import config_from_state_dict, load_checkpoint

        config = config_from_state_dict(load_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle), **overrides)
    convert_checkpoint(
        args.checkpoint,
        args.output_dir,
        config=config,
        verify=args.verify,
        push_to_hub=args.push_to_hub,
        allow_pickle=args.allow_pickle,
    )
    print(f"Wrote {args.output_dir}" + (" (verified)" if args.verify else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align-detr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an mmdetection Align-DETR checkpoint")
    convert.add_argument("--checkpoint", required=True, help="path or URL of the .pth file")
    convert.add_argument("--output-dir", required=True, help="folder to write (replaced only on success)")
    convert.add_argument("--verify", action="store_true", help="reload the written folder and check it")
    convert.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push to this Hub repository")
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow full unpickling if weights_only loading fails (runs code from the file: trusted files only)",
    )
    convert.add_argument("--num-denoising-queries", type=int, default=None, help="training-only setting to record")
    convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"align-detr {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
