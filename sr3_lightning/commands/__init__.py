"""The project's commands (``python -m sr3_lightning CMD``); a module's docstring is its ``--help`` text."""

from __future__ import annotations

import textwrap

from jsonargparse import ArgumentParser, DefaultHelpFormatter


class HelpFormatter(DefaultHelpFormatter):
    """Re-wraps a docstring's prose to the terminal but keeps indented lines (example commands) and lists
    as written, one per line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith((" ", "- ")) for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                prose = " ".join(line.strip() for line in lines)
                filled = textwrap.fill(prose, width, initial_indent=indent, subsequent_indent=indent)
                paragraphs.append(filled)
        return "\n\n".join(paragraphs)


def command_parser(name: str, doc: str | None) -> ArgumentParser:
    """The parser of command ``name``: its docstring as the description, no abbreviated flags."""
    return ArgumentParser(
        prog=f"sr3-lightning {name}", description=doc, formatter_class=HelpFormatter, allow_abbrev=False
    )
