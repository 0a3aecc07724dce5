"""--dry-run prints the resolved plan and its cost, and writes nothing."""

import pytest
from infusion_lm.cli import main
from tiny import write_corpus as _write_corpus, write_recipe as _recipe
from tiny import toy_corpus


@pytest.mark.slow
def test_dry_run_prints_plan_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus)
    assert main(["run", str(recipe), "--dry-run", "select.k=2"]) == 0
    out = capsys.readouterr().out
    assert "corpus 12 documents" in out and "edit k=2 with swap" in out
    for stage in ("fit", "score", "edit", "retrain", "evaluate", "total"):
        assert f"\n{stage}" in out, stage
    assert "to run" in out and not (tmp_path / "run").exists()
    # After the influence stages ran, the plan marks them cached.
    assert main(["score", str(recipe), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith(("fit ", "score "))] == ["cached", "cached"]


def test_the_dry_run_counts_every_retraining_seed(tmp_path, tiny_model_dir):
    """Every arm is retrained once per seed, so three seeds cost three times one seed's retraining."""
    from infusion_lm.config import load_recipe
    from infusion_lm.dry_run import plan
    from infusion_lm.pipeline import Pipeline

    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus)
    retrain = {}
    for seeds in ([0], [0, 1, 2]):
        rec = load_recipe(str(recipe), [f"retrain.seeds={seeds}"])
        rows = {r["stage"]: r for r in plan(Pipeline(rec, progress=False))["stages"]}
        retrain[len(seeds)] = rows["retrain"]["token_passes"]
    assert retrain[1] > 0 and retrain[3] == 3 * retrain[1]
