"""docs/recipes.md is generated from the section dataclasses' field help (infusion_lm/recipe_reference.py): it must be
that output exactly, so it cannot go stale, and every key of every section of every shipped modality must be in it.
The links between the repository's documents must resolve, too.

After changing a field or its help: python -m infusion_lm.recipe_reference > docs/recipes.md"""

import re
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"
REGENERATE = "python -m infusion_lm.recipe_reference > docs/recipes.md"


def test_recipes_md_is_the_generated_reference():
    from infusion_lm.recipe_reference import recipe_reference_markdown

    assert DOC.read_text(encoding="utf-8") == recipe_reference_markdown(), f"docs/recipes.md is stale: {REGENERATE}"


def test_every_field_of_every_section_is_listed_in_its_section():
    from infusion_lm.config import SECTION_ORDER
    from infusion_lm.recipe_reference import recipe_reference_markdown, sections_by_modality

    text = recipe_reference_markdown()
    chunks = dict(zip(["intro", "run", *SECTION_ORDER], re.split(r"\n## ", text)))
    modalities = sections_by_modality()
    assert {"text", "image"} <= set(modalities)
    missing = []
    for name, classes in modalities.items():
        for section, cls in classes.items():
            prefix = "" if section == "run" else f"{section}."
            for f in fields(cls):
                if f.init and f"| `{prefix}{f.name}` |" not in chunks[section]:
                    missing.append(f"{name}: {prefix}{f.name}")
    assert missing == []


def test_help_text_reaches_the_table_intact():
    from infusion_lm.config import InfluenceArguments
    from infusion_lm.recipe_reference import recipe_reference_markdown

    text = recipe_reference_markdown()
    strategy = next(f for f in fields(InfluenceArguments) if f.name == "strategy")
    assert strategy.metadata["help"].replace("|", "\\|") in text  # pipes escaped, nothing else changed
    assert "| `influence.strategy` | `ekfac` |" in text
    assert "torchvision:&lt;name&gt;" in text  # an angle-bracket placeholder is not swallowed as an HTML tag


def test_a_changed_help_text_shows_in_the_reference(monkeypatch):
    from infusion_lm.config import SelectArguments
    from infusion_lm.recipe_reference import recipe_reference_markdown

    k = next(f for f in fields(SelectArguments) if f.name == "k")
    monkeypatch.setattr(k, "metadata", {**k.metadata, "help": "A reworded help text."})
    assert "| `select.k` | `8` | A reworded help text. |" in recipe_reference_markdown()


def anchors(doc: Path) -> set:
    """The anchors GitHub gives a document's headings (lower case, punctuation dropped, spaces as hyphens), and its
    explicit ``id``s."""
    text = re.sub(r"```[\s\S]*?```", "", doc.read_text(encoding="utf-8"))
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return slugs | set(re.findall(r'id="([^"]+)"', text))


def test_relative_links_in_the_docs_resolve():
    docs = [ROOT / "README.md", ROOT / "evals" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert (ROOT / "docs" / "method.md").is_file() and (ROOT / "evals" / "README.md").is_file()
    broken = []
    for doc in docs:
        text = re.sub(r"```[\s\S]*?```", "", doc.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            where = (doc.parent / path) if path else doc
            if not where.exists() or (anchor and where.suffix == ".md" and anchor not in anchors(where)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_docs_stand_alone():
    """No document points outside the repository (internal notes, another checkout's files)."""
    docs = [ROOT / "README.md", ROOT / "evals" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = [f"{d.relative_to(ROOT)}" for d in docs if re.search(r"\.\./shared|DESIGN\.md|/work/", d.read_text())]
    assert outside == []
