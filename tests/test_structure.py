"""The package's shape: no import cycles (lazy imports inside functions included, since they only hide a cycle), and
modalities reached through the registry."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "infusion_lm"


def import_graph(pkg: Path = PKG) -> dict:
    """module -> the package modules it imports anywhere in its body."""
    mods = {}
    for f in pkg.rglob("*.py"):
        parts = f.relative_to(pkg.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = ".".join(base[: len(base) - node.level + 1] + [node.module] if node.module else
                                  base[: len(base) - node.level + 1]) if node.level else node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                found = subs if (subs or node.module is None) else [target]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in found if t in mods and t != m}
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("from .a import f\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_modalities_come_from_the_registry():
    from infusion_lm.config import load_recipe
    from infusion_lm.errors import ConfigError
    from infusion_lm.modalities import MODALITIES, modality_class
    from infusion_lm.text.modality import TextModality
    from infusion_lm.vision.modality import ImageModality

    assert modality_class("text") is TextModality and modality_class("image") is ImageModality
    assert set(MODALITIES) == {"text", "image"}
    with pytest.raises(ConfigError, match="not one of image, text"):
        load_recipe(raw={"modality": "audio", "model": "x", "corpus": "y"})


def test_no_module_imports_another_modules_private_names():
    private = []
    for f in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("infusion_lm"))
            if ours:
                private += [f"{f.relative_to(PKG)}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert private == []


def test_run_folder_names_each_output_once():
    """Output file names are spelled in run_folder.py only (the layout a user reads there is the one code writes)."""
    import re

    names = ["edits.jsonl", "scores.safetensors", "ihvp.safetensors", "selection.json", "measure.json",
             "observations.json", "results.json", "report.html", "report.md", "infused_corpus", "summary.json"]
    spelled = {}
    for f in PKG.rglob("*.py"):
        if f.name == "run_folder.py":
            continue
        code = re.sub(r'"""[\s\S]*?"""', "", f.read_text(encoding="utf-8"))  # docstrings may describe the layout
        for n in names:
            if re.search(rf"[\"'/]{re.escape(n)}[\"']", code):
                spelled.setdefault(n, []).append(str(f.relative_to(PKG)))
    assert spelled == {}


# The core is every module at the package's top level: stages, caching, influence (and the causal-LM computations it
# is built on: causal_lm, task), retraining, statistics, the report layout, the run folder, the CLI. The text and image
# modalities (infusion_lm/text/, infusion_lm/vision/) and the causal-LM front ends (api.py, callbacks.py, and the
# package's own exports) sit on top of it.
FRONT_ENDS = {"infusion_lm", "infusion_lm.api", "infusion_lm.callbacks", "infusion_lm.__main__"}
CORE = sorted(m.split(".")[1] for m in import_graph() if m.count(".") == 1 and m not in FRONT_ENDS)


def test_the_core_is_the_top_level():
    assert {"stages", "pipeline", "influence", "retrain", "config", "causal_lm", "measurement", "devices"} <= set(CORE)
    for gone in ("corpus", "losses", "models"):  # text code lives under text/
        assert gone not in CORE


def test_the_core_imports_no_modality():
    graph = import_graph()
    reached = {}
    for name in CORE:
        mod = f"infusion_lm.{name}"
        assert mod in graph, f"{mod} is gone: update CORE"
        bad = sorted(t for t in graph[mod] if t.startswith(("infusion_lm.text", "infusion_lm.vision")))
        if bad:
            reached[mod] = bad
    assert reached == {}, f"core modules import a modality: {reached}"


def test_the_core_check_sees_a_modality_import(tmp_path):
    pkg = tmp_path / "infusion_lm"
    (pkg / "text").mkdir(parents=True)
    for f in ("__init__.py", "text/__init__.py", "text/editors.py"):
        (pkg / f).write_text("")
    (pkg / "stages.py").write_text("def f():\n    from .text.editors import x\n")
    assert import_graph(pkg)["infusion_lm.stages"] == {"infusion_lm.text.editors"}


def test_no_module_is_over_400_lines():
    long = {str(f.relative_to(PKG)): n for f in PKG.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}


def test_no_undefined_or_unused_names():
    """pyflakes' checks (ruff's F rules) over the package, the evals and the tests: an undefined name is a crash on
    the one path that reaches it (an arm a test never runs), so it must fail here first."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: run `make setup` (it comes with the dev extra).")
    root = PKG.parent
    out = subprocess.run([ruff, "check", "--select", "F", "--output-format", "concise", "--no-cache",
                          "infusion_lm", "evals", "tests", "examples"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_modality_gets_a_context_and_never_the_pipeline(tmp_path, tiny_model_dir):
    """A modality is built with a RunContext: the recipe, the run folder and the listed handles and services. It keeps
    no reference to the pipeline, and asking its context for anything else names what it holds."""
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.run_context import HANDLES, SERVICES, RunContext

    for f in ("text/modality.py", "vision/modality.py"):
        assert "self.pipe" not in (PKG / f).read_text(encoding="utf-8"), f
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "The dog ran to the park."}\n{"text": "A cat sat on the mat."}\n')
    pipe = Pipeline(load_recipe(raw={"model": str(tiny_model_dir), "corpus": str(corpus), "max_length": 16,
                                     "output_dir": str(tmp_path / "run"),
                                     "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat",
                                                     "documents": ["The dog ran."]}}), progress=False)
    ctx = pipe.modality.ctx
    assert isinstance(ctx, RunContext) and ctx.recipe is pipe.recipe and ctx.dir == pipe.dir
    assert not any(v is pipe for v in vars(pipe.modality).values()) and not any(v is pipe for v in vars(ctx).values())
    # the handles are the pipeline's own caches (loaded once), the services its methods
    assert ctx.dataset is pipe.dataset and ctx.tokenizer is pipe.tokenizer and ctx.model is pipe.model
    assert ctx.stage_fingerprint("corpus") == pipe.stage_fingerprint("corpus")
    assert set(HANDLES) | set(SERVICES) <= set(dir(ctx))
    with pytest.raises(AttributeError, match="has no 'recipe_sections'.*base_model"):
        ctx.recipe_sections
