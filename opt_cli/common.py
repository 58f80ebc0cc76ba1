"""What every `opt-lm` subcommand's module shares: the embedded model's folder and the integer option type.
Imported by `opt_cli.main` and the subcommand modules it registers (which cannot import `main` back)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "default_model"


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper end without `high`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value

    return parse
