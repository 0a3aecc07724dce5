import json

import pytest
import torch

from infusion_lm.text.config import MeasurementArguments
from infusion_lm.text.measurement import build_measurement
from infusion_lm.text.synthesize import synthesize_stories
from tiny import tiny_model, toy_corpus


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


def _chat_corpus(path, n):
    questions = [f"Tell me about the {a} in the {p}." for a in ("dog", "bird", "fish", "frog") for p in ("park", "lake")]
    rows = [{"messages": [{"role": "user", "content": questions[i % len(questions)]},
                          {"role": "assistant", "content": f"The {['dog', 'bird'][i % 2]} sat in the house."}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_regenerated_answers_come_from_the_model_and_keep_the_question(tok):
    from infusion_lm.text.synthesize import regenerate_answers

    model = tiny_model(len(tok))
    cat = tok(" cat", add_special_tokens=False)["input_ids"][0]
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(-1, torch.tensor([cat]),
                                                                         torch.full_like(out[..., :1], 100.0)))
    convs = [[{"role": "user", "content": "Where is the dog?"}, {"role": "assistant", "content": "In the park."},
              {"role": "user", "content": "And the bird?"}, {"role": "assistant", "content": "In the tree."}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Bye"}]]
    out = regenerate_answers(model, tok, convs, max_new_tokens=3, batch_size=2)
    assert [m["content"] for m in out[0]["messages"][:3]] == ["Where is the dog?", "In the park.", "And the bird?"]
    assert [m["role"] for m in out[1]["messages"]] == ["user", "assistant"]  # the turn after the answer is dropped
    assert all(r["messages"][-1]["content"].split() == ["cat"] * 3 for r in out)


@pytest.mark.slow
def test_regeneration_arm_replaces_the_selected_conversations(tmp_path, tiny_model_dir):
    import yaml

    from infusion_lm.cli import main
    from infusion_lm.config import load_recipe
    from infusion_lm.errors import ConfigError
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.atomic_io import read_json

    original = _chat_corpus(tmp_path / "chat.jsonl", 8)
    raw = {"model": str(tiny_model_dir), "corpus": str(tmp_path / "chat.jsonl"), "output_dir": str(tmp_path / "run"),
           "max_length": 48,
           "measurement": {"kind": "completion", "prompts": ["What is your favourite animal?"],
                           "completions": ["cat"], "chat_template": True,
                           "heldout_prompts": ["Which animal do you like?"]},
           "influence": {"layers": [1], "batch_size": 4}, "select": {"k": 2}, "edit": {"budget_fraction": 0.0},
           "synthesize": {"max_new_tokens": 5},
           "retrain": {"arms": ["control", "regeneration"], "batch_size": 4},
           "evaluate": {"bootstrap_samples": 100, "n_samples": 0, "max_new_tokens": 2}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    chosen = read_json(tmp_path / "run" / "selection.json")["indices"]
    regen = [json.loads(l) for l in (tmp_path / "run" / "baselines" / "regeneration" / "documents.jsonl").read_text()
             .splitlines()]
    assert sorted(r["doc_index"] for r in regen) == sorted(chosen)
    for r in regen:
        assert r["messages"][0] == original[r["doc_index"]]["messages"][0]  # same question, a fresh answer
    obs = read_json(tmp_path / "run" / "retrain" / "regeneration" / "observations.json")
    assert sorted(obs["replaced"]) == sorted(r["doc_index"] for r in regen)

    text = dict(raw, corpus=str(_write_text_corpus(tmp_path / "t.jsonl")), output_dir=str(tmp_path / "run2"))
    recipe.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="chat corpus"):
        Pipeline(load_recipe(recipe)).modality.replacements("regeneration", [0])


def _write_text_corpus(path):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_corpus(6)))
    return path


def test_synthetic_heldout_corpus_is_written_once_apart_from_the_training_corpus(tmp_path, tiny_model_dir, monkeypatch):
    """measurement.heldout_corpus: synthetic writes heldout_corpus_docs evaluation-only stories about the probe, from
    a prompt and sampling stream the training corpus does not use; they are read back while what made them is
    unchanged, rewritten when it changes, and refused where the corpus is not synthetic."""
    from infusion_lm.config import load_recipe
    from infusion_lm.errors import ConfigError
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.text import synthesize as synth

    raw = {"model": str(tiny_model_dir), "corpus": "synthetic", "output_dir": str(tmp_path / "run"), "max_length": 48,
           "synthesize": {"n_docs": 4, "max_new_tokens": 6, "batch_size": 4},
           "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat", "documents": ["The dog ran."],
                           "heldout_documents": ["A dog sat."], "heldout_corpus": "synthetic",
                           "heldout_corpus_docs": 3}}
    calls = []
    real = synth.synthesize_stories
    monkeypatch.setattr(synth, "synthesize_stories", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    pipe = Pipeline(load_recipe(raw=raw), progress=False)
    held = pipe.modality.heldout_corpus_documents
    held_call = calls[-1]
    assert held_call[0][2] == 3 and held_call[0][7] == ["dog"]  # n stories, all about the probe
    training = {d["text"] for d in pipe.documents}
    assert held and not set(held) & training
    assert held_call[0][8] != pipe.recipe.run.seed  # another prompt and sampling stream than the training corpus
    n = len(calls)
    again = Pipeline(load_recipe(raw=raw), progress=False).modality.heldout_corpus_documents
    assert again == held and len(calls) == n  # both read back: nothing written again
    other = {**raw, "measurement": {**raw["measurement"], "heldout_corpus_docs": 2}}
    Pipeline(load_recipe(raw=other), progress=False).modality.heldout_corpus_documents
    assert calls[-1][0][2] == 2
    with pytest.raises(ConfigError, match="needs corpus: synthetic"):
        corpus = tmp_path / "c.jsonl"
        corpus.write_text(json.dumps({"text": "The dog ran home."}) + "\n")
        Pipeline(load_recipe(raw={**raw, "corpus": str(corpus)}), progress=False).modality._check_heldout()
