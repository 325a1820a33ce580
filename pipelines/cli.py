"""Shared command-line plumbing: an argparse that reports mistakes as one `UserError` line."""

from __future__ import annotations

import argparse

from app.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def config_parser(prog: str, description: str) -> ArgumentParser:
    """A parser for `<job> [CONFIG] [key=value ...]`."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", nargs="?", default=None, help="YAML recipe, e.g. conf/default.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. moe.num_experts=16")
    return parser


def split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`info moe.num_experts=4` (no YAML) puts the first override where the config path goes."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)
