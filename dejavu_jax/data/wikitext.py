"""WikiText-2 test text, as the usual Hugging Face perplexity recipe builds it.

The recipe is ``"\\n\\n".join(dataset["text"])`` over the rows of ``wikitext-2-raw-v1``'s
test split, where the ``datasets`` loader yields each line of ``wiki.test.raw`` with its
``"\\n"``, and ``""`` for a blank line. `wikitext2_text` does the same from the file committed
under ``data/wikitext2/`` (CC BY-SA 3.0; see the README there), so no hub access is needed.
"""

from __future__ import annotations

from pathlib import Path

from dejavu_jax.errors import DejavuError

REPO_ROOT = Path(__file__).resolve().parents[2]
WIKITEXT2_TEST = REPO_ROOT / "data" / "wikitext2" / "wiki.test.raw"


def wikitext2_rows(path: str | Path = WIKITEXT2_TEST) -> list[str]:
    """The dataset rows: each line with its newline, blank lines as ``""``."""
    path = Path(path)
    if not path.is_file():
        raise DejavuError(
            f"WikiText-2 test file {path} not found; it is committed as data/wikitext2/wiki.test.raw "
            "in the repository (run from a clone), or pass --wikitext PATH.")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [line if line.strip() else "" for line in lines]


def wikitext2_text(path: str | Path = WIKITEXT2_TEST) -> str:
    """``"\\n\\n".join(rows)``: the text the standard recipe tokenizes (one BOS at its start)."""
    return "\n\n".join(wikitext2_rows(path))
