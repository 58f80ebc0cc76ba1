"""The embedded model's corpus: the documentation strings of Python's standard library, gathered at training time.

    python -m opt_cli.corpus stdlib_docstrings.txt

Every machine with Python has this text, so the embedded model can be retrained anywhere. With them, the language
reference topics `help()` shows (pydoc_data/topics.py). Docstrings are read with
`ast` from the standard library's source files (nothing is imported, so nothing runs), in sorted file order; each
docstring becomes one paragraph, duplicates dropped. Tests, IDLE, tkinter demos and lib2to3 fixtures are skipped.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

SKIPPED_PARTS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__", "fixers"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_PARTS & set(p.relative_to(root).parts))


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    texts = (ast.get_docstring(node) for node in nodes)
    return [text.strip() for text in texts if text and len(text.split()) >= 4]


def pydoc_topics() -> list[str]:
    """The language reference's topics that `help()` shows, stored as string constants in pydoc_data/topics.py."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    strings = (n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
    return [s.strip() for s in strings if len(s.split()) >= 20]


def gather() -> str:
    seen, paragraphs = set(), []
    for path_texts in (*map(docstrings, stdlib_files()), pydoc_topics()):
        for text in path_texts:
            if text not in seen:
                seen.add(text)
                paragraphs.append(text)
    return "\n\n".join(paragraphs) + "\n"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m opt_cli.corpus OUTPUT.txt")
    text = gather()
    Path(sys.argv[1]).write_text(text, encoding="utf-8")
    print(f"wrote {len(text):,} characters ({len(text.split()):,} words) to {sys.argv[1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
