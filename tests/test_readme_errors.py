"""Every message the README's Errors table quotes is one the code can print: each run of three or more words of a
quoted message (the parts between values such as numbers, quoted names and paths) is made of a few pieces of the
strings the library writes (its string literals and f-string parts, docstrings left out): at most one piece per two
words, where a value such as a type's name was put between them. A message reworded in the code, or one only a
library below us prints, fails here."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def library_strings() -> str:
    """The literal parts of every string constant and f-string in infusion_lm (not docstrings), one per line."""
    parts = []
    for path in (ROOT / "infusion_lm").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                parts.append(node.value)
    return "\n".join(parts)


def printable(run: str, source: str) -> bool:
    """``run`` is the concatenation of at most 1 + words/2 pieces (≥ 2 characters each) of the library's strings."""
    limit = 1 + len(run.split()) // 2
    best = [0] + [limit + 1] * len(run)  # best[i]: fewest pieces covering run[:i]
    for i in range(1, len(run) + 1):
        for j in range(i - 2, -1, -1):
            if best[j] < best[i] - 1 and run[j:i] in source:
                best[i] = best[j] + 1
    return best[-1] <= limit


def quoted_messages() -> list:
    text = (ROOT / "README.md").read_text()
    table = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[1].startswith("`"):
            out.append(cells[1].strip("`").strip())
    return out


def word_runs(message: str) -> list:
    """The literal stretches of a rendered message: split at anything a value could have put there."""
    runs = []
    for frag in message.split("..."):
        for piece in re.split(r"['\"`\[\]{}]|\S*\d\S*|\S*/\S*|\S+\.\w+\S*|\S*_\S*", frag):
            piece = piece.strip(" .,;:()")
            if len(piece.split()) >= 3:
                runs.append(piece)
    return runs


def test_every_quoted_error_message_is_in_the_code():
    messages = quoted_messages()
    assert len(messages) >= 25, len(messages)
    source = library_strings()
    missing = {m: r for m in messages for r in word_runs(m) if not printable(r, source)}
    assert not missing, missing


def test_the_check_catches_a_message_the_code_does_not_print():
    source = library_strings()
    assert not all(printable(r, source) for r in word_runs("argument --max_length: invalid int value: 'abc'"))
    assert not all(printable(r, source) for r in word_runs("The tokenizer exploded while reticulating splines ..."))
    assert all(printable(r, source) for r in word_runs("`max_length` must be an integer, not 'abc'."))
