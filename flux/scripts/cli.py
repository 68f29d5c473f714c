"""What every command-line tool here shares: a refused argument is one line on stderr
(argparse prints its usage first), and number types that say their range."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, with an error as one line: `prog: error: MESSAGE (see --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _number(kind: type, low: float, what: str, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or value < low or (strict and value == low):  # NaN, out of range
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, "a positive integer", strict=True)
nonnegative_int = _number(int, 0, "an integer >= 0", strict=False)
positive_float = _number(float, 0.0, "a positive number", strict=True)
nonnegative_float = _number(float, 0.0, "a number >= 0", strict=False)


def one_line(error: BaseException) -> str:
    """An error's message on one line (library messages often span several)."""
    text = str(error) if not isinstance(error, OSError) or not error.strerror else None
    if text is None:
        assert isinstance(error, OSError)
        where = f" {error.filename}" if error.filename else ""
        text = f"cannot read{where} ({error.strerror})"
    return " ".join(text.split())


def fail(prog: str, error: BaseException) -> NoReturn:
    """Print `prog: error: MESSAGE` (one line) and exit 2."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(2)
