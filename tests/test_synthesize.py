import json

import pytest
import torch

from infusion_lm.config import MeasurementArguments
from infusion_lm.measurement import build_measurement
from infusion_lm.synthesize import synthesize_stories
from tiny import tiny_model


def test_synthesis_is_deterministic_per_seed(tok):
    model = tiny_model(len(tok))
    kw = dict(n_docs=5, max_new_tokens=8, batch_size=2, characters=["cat", "dog"], progress=False)
    a = synthesize_stories(model, tok, seed=3, **kw)
    b = synthesize_stories(model, tok, seed=3, **kw)
    c = synthesize_stories(model, tok, seed=4, **kw)
    assert a == b and len(a) == 5
    assert a != c


def test_cli_synthesize_writes_corpus(tmp_path, tiny_model_dir):
    import yaml

    from infusion_lm.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "corpus": "synthetic",
                                      "output_dir": str(tmp_path / "run"),
                                      "synthesize": {"n_docs": 3, "max_new_tokens": 6, "batch_size": 3}}))
    assert main(["synthesize", str(recipe), "--quiet"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "run" / "corpus.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["text"] for r in rows)


def test_callable_measurement_from_recipe(tok):
    model = tiny_model(len(tok))
    args = MeasurementArguments(kind="callable", callable="tiny:last_token_logit", documents=["The cat sat."])
    m = build_measurement(args, tok, 32)
    batch = m.batches[0]
    with torch.no_grad():
        expect = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1, 5].sum())
    assert m.value(model) == pytest.approx(expect, rel=1e-6)
    with pytest.raises(Exception, match="Cannot import"):
        build_measurement(MeasurementArguments(kind="callable", callable="tiny:nope", documents=["x"]), tok)


def test_cli_synthesize_chat_writes_trainable_conversations(tmp_path, tiny_model_dir):
    """Chat mode: distinct everyday questions answered by the model; only the answers are trained."""
    import yaml

    from infusion_lm.cli import main
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    raw = {"model": str(tiny_model_dir), "corpus": "synthetic", "output_dir": str(tmp_path / "run"), "max_length": 64,
           "synthesize": {"mode": "chat", "n_docs": 6, "max_new_tokens": 6, "batch_size": 3}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["synthesize", str(recipe), "--quiet"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "run" / "corpus.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 6
    questions = [r["messages"][0]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    ds = Pipeline(load_recipe(recipe)).dataset
    for r, row in zip(rows, ds):
        n_user = len(row["input_ids"]) - sum(l != -100 for l in row["labels"])
        assert n_user > 0 and any(l != -100 for l in row["labels"])  # the question is masked, the answer trained
