"""The README's Python example runs as written, on the tiny test model instead of SmolLM2.

The example is the first ```python block under the README's "## Python" heading. Its data lines are the ones a
reader replaces with their own: the statement that binds ``model, tokenizer`` and the one that binds ``texts``. This
test drops exactly those two statements and runs the rest with ``model``, ``tokenizer`` and ``texts`` bound to the
tiny Llama, its tokenizer and the toy corpus; every other line (the imports, the measurement, ``infuse``,
``retrain_arms``, ``compare``) runs unchanged."""

import ast
import re
from pathlib import Path

from tiny import toy_corpus

ROOT = Path(__file__).resolve().parents[1]
DATA_LINES = ("model, tokenizer", "texts")  # the targets of the statements a reader supplies


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n([\s\S]*?)```", section)
    assert match, "no ```python block under the README's ## Python heading"
    return match.group(1)


def without_data_lines(source: str) -> str:
    """The example without the statements that bind the reader's model, tokenizer and texts (each exactly once)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    dropped = []
    for node in tree.body:
        target = ast.unparse(node.targets[0]).strip("()") if isinstance(node, ast.Assign) else None
        if target in DATA_LINES:
            dropped.append(target)
            for i in range(node.lineno - 1, node.end_lineno):
                lines[i] = ""
    assert sorted(dropped) == sorted(DATA_LINES), f"the example binds its data as {dropped}, expected {DATA_LINES}"
    return "\n".join(lines)


def test_the_readme_example_runs_on_the_tiny_model(tiny_setup, capsys):
    example = readme_example()
    assert len(example.strip().splitlines()) <= 16, "keep the README example short"
    model, tokenizer = tiny_setup["model"], tiny_setup["tok"]
    texts = toy_corpus(32)
    scope = {"model": model, "tokenizer": tokenizer, "texts": texts, "__name__": "readme_example"}
    exec(compile(without_data_lines(example), "README.md:python", "exec"), scope)

    result = scope["result"]
    k = next(kw.value.value for node in ast.walk(ast.parse(example)) if isinstance(node, ast.Call)
             and getattr(node.func, "id", "") == "infuse" for kw in node.keywords if kw.arg == "k")
    assert len(result.indices) == k == len(set(result.indices))
    edited = result.apply()
    assert len(edited) == len(texts)
    assert any(edited[i]["input_ids"] != result.rows[i]["input_ids"] for i in result.indices), "no row was edited"
    assert all(edited[i] == result.rows[i] for i in range(len(texts)) if i not in result.indices)
    delta = scope["compare"](scope["observed"])["infused"]["heldout"].delta_f
    assert delta.ci is not None and delta.n_seeds == len(scope["observed"]["control"])
    assert str(delta) in capsys.readouterr().out  # the example's last line printed Δf with its CI
