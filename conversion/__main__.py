"""`python -m conversion SRC DST --to FORMAT ...`: converts an OPT checkpoint (see `conversion.converter`)."""

from __future__ import annotations

import argparse
import sys

from conversion.converter import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Parses `argv` (default: the command line), converts, and returns the exit code.

    Args:
        argv: the arguments after the program name.
    """
    parser = argparse.ArgumentParser(
        prog="python -m conversion",
        description="Convert an OPT checkpoint (HF safetensors / .bin / tf_model.h5 / flax_model.msgpack, or "
        "metaseq originals) into an HF folder of any format and dtype.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
