"""One vocabulary for command-line flags: transformers' names (`--output_dir`, `--max_steps`, ...) spelled with
underscores or hyphens, old spellings kept as deprecated aliases that still work and print a note."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_deprecated_alias", "add_flag"]


def _spellings(name: str) -> list[str]:
    underscored = "--" + name.lstrip("-").replace("-", "_")
    hyphenated = underscored.replace("_", "-")
    return [underscored] if hyphenated == underscored else [underscored, hyphenated]


def add_flag(container, name: str, *, deprecated: tuple[str, ...] | list[str] = (), **kwargs) -> argparse.Action:
    """Add `--name` in both spellings (`--output_dir`, `--output-dir`); `deprecated` names (e.g. `steps` for
    `max_steps`) are accepted too, in both spellings, hidden from --help, with a note on stderr when used."""
    action = container.add_argument(*_spellings(name), **kwargs)
    for old in deprecated:
        add_deprecated_alias(container, action, *_spellings(old))
    return action


class _DeprecatedAlias(argparse.Action):
    """An old option string of `target`: parses as it does, stores through it, notes the new name on stderr."""

    def __init__(self, option_strings, dest, target: argparse.Action, **kwargs):
        super().__init__(option_strings, dest=target.dest, nargs=target.nargs, const=target.const,
                         default=argparse.SUPPRESS, type=target.type, choices=target.choices, help=argparse.SUPPRESS,
                         metavar=target.metavar)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated; use {self.target.option_strings[0]}",
              file=sys.stderr)
        self.target(parser, namespace, values, self.target.option_strings[0])


def add_deprecated_alias(container, action: argparse.Action, *option_strings: str) -> None:
    """Accept `option_strings` (old spellings) for `action`, hidden from --help, with a deprecation note."""
    container.add_argument(*option_strings, action=_DeprecatedAlias, target=action)
