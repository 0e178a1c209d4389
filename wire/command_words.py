"""The words of a command line that runs a device command (`campus-fleet cmd`, `campus-agent
command`): positional words, and named options written `--NAME VALUE`, `--NAME=VALUE`, a bare
`--NAME` (true) or `-o NAME=VALUE` (for a name that is also one of the tool's own options)."""

from __future__ import annotations

import re
from collections.abc import Sequence

OPTION_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.-]{0,63}$")


def split_words(
    words: Sequence[str], pairs: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """(positional words, named options as text); ValueError naming what is wrong."""
    positionals: list[str] = []
    named: dict[str, str] = {}

    def add(name: str, value: str, written: str) -> None:
        if not OPTION_NAME.match(name):
            raise ValueError(f"{written!r} is not an option name (--name VALUE)")
        if name in named:
            raise ValueError(f"option --{name} is given twice")
        named[name] = value

    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("--") and len(word) > 2:
            name, equals, value = word[2:].partition("=")
            if not equals:
                following = words[index + 1] if index + 1 < len(words) else None
                if following is None or following.startswith("--"):
                    value = "true"
                else:
                    value = following
                    index += 1
            add(name, value, word)
        else:
            positionals.append(word)
        index += 1
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise ValueError(f"-o {pair!r}: write NAME=VALUE")
        add(name, value, f"-o {pair}")
    return positionals, named


def extra_words(positionals: Sequence[str], usage_hint: str) -> str:
    """The message for words after ARGUMENT (text with spaces that lost its quotes)."""
    extra = " ".join(repr(word) for word in positionals[3:])
    return (
        f"unexpected {extra} after ARGUMENT {positionals[2]!r} (put text with spaces in quotes; "
        f"options are {usage_hint})"
    )
