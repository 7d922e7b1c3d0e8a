"""The project's commands (``python -m sr3_lightning CMD``); a module's docstring is its ``--help`` text."""

from __future__ import annotations

import argparse

from jsonargparse import ArgumentParser, DefaultHelpFormatter


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps a docstring's line breaks in ``--help``, so its example command lines stay one per line."""


def command_parser(name: str, doc: str | None) -> ArgumentParser:
    """The parser of command ``name``: its docstring as the description, no abbreviated flags."""
    return ArgumentParser(
        prog=f"sr3-lightning {name}", description=doc, formatter_class=HelpFormatter, allow_abbrev=False
    )
