"""What the `fleet` commands share on their command lines: the parser, whose usage errors
are one line and exit status 2, the argument types that check numbers and ports, and the
options several commands take (`--json`), declared here once.

A command adds a shared option after its own, so its `--help` lists it last. (argparse's
parent parsers would list it first, and cost a parser each to build on every start.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeAlias

EXIT_USAGE = 2
Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


if TYPE_CHECKING:
    Subcommands: TypeAlias = argparse._SubParsersAction[Parser]
else:  # not subscriptable at run time
    Subcommands = argparse._SubParsersAction


def subcommands(parser: Parser, dest: str) -> Subcommands:
    """The subcommands of `parser`, one of which must be given; its name goes to `dest`."""
    return parser.add_subparsers(dest=dest, required=True, parser_class=Parser)


def add_json_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--json`: print JSON instead of a table or text. `help` says what the JSON holds,
    where a command documents it."""
    parser.add_argument("--json", action="store_true", help=help)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be 1 or more (got 0)")
    return value


def float_above(minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a number above `minimum` (or equal to it, if `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if inclusive and not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum:g} or more (got {text})")
        if not inclusive and not value > minimum:
            raise argparse.ArgumentTypeError(f"must be above {minimum:g} (got {text})")
        return value

    return parse


positive_float = float_above(0, inclusive=False)
non_negative_float = float_above(0, inclusive=True)


def port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value} (valid: 0-65535)")
    return value
