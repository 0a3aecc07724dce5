"""Retrain (HF Trainer, every arm from the same clean checkpoint), evaluate and report, end to end on a tiny model."""

import json
import math

import pytest

from infusion_lm.cli import main
from infusion_lm.atomic_io import read_json
from tiny import snapshot as _snapshot, write_corpus as _write_corpus, write_recipe as _recipe
from tiny import toy_corpus

HELDOUT = ["The dog looked at the lake. The dog was happy."]
FAST = {"edit": {"budget_fraction": 0.15, "steps": 4, "n_candidates": 8},
        "retrain": {"arms": ["control", "infused", "random", "insertion"], "batch_size": 4, "learning_rate": 1e-3},
        "evaluate": {"bootstrap_samples": 200, "candidates": ["bird", "fish"]}}


def _run_recipe(tmp_path, model_dir, **over):
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    cfg = {**FAST, **over}
    cfg["measurement"] = {"heldout_documents": HELDOUT, **cfg.get("measurement", {})}
    return _recipe(tmp_path, model_dir, corpus, **cfg)


@pytest.mark.slow
def test_run_end_to_end_results_and_report(tmp_path, tiny_model_dir):
    import numpy as np

    heldout_corpus = _write_corpus(tmp_path / "held.jsonl", toy_corpus(40, seed=7) + toy_corpus(12)[:2])
    arms = [*FAST["retrain"]["arms"], "fluent_target"]
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**FAST["retrain"], "arms": arms, "epochs": 2,
                                                            "seeds": [0, 1], "influence_at": "checkpoint"},
                         measurement={"heldout_corpus": str(heldout_corpus), "heldout_corpus_max_positions": 9})
    assert main(["run", str(recipe), "--quiet", "influence.fd_eps_rel=1e-3"]) == 0
    run = tmp_path / "run"
    res = read_json(run / "results.json")
    assert set(res["arms"]) == {"infused", "random", "insertion", "fluent_target"}
    assert res["seeds"] == [0, 1] and res["primary_set"] == "heldout_corpus"
    obs = {a: read_json(run / "retrain" / a / "observations.json") for a in ["control", *res["arms"]]}
    # Two seeds are two data orders: control's weights differ between them, and every arm was trained per seed.
    assert obs["control"]["per_seed"]["0"]["weights"] != obs["control"]["per_seed"]["1"]["weights"]
    for arm, e in res["arms"].items():
        for s in ("measurement", "heldout", "heldout_corpus"):
            d = e[s]["delta_f"]
            # Δf is arm − control within each seed, item by item, read back from the raw observation files.
            per_seed = [np.mean(np.subtract(obs[arm]["per_seed"][k][s]["f"], obs["control"]["per_seed"][k][s]["f"]))
                        for k in ("0", "1")]
            assert d["per_seed"] == pytest.approx(per_seed, abs=1e-9) and d["n_seeds"] == 2
            assert "delta_p_target" in e[s] and "target_specific_gain" in e[s]["specificity"]
        assert e["weights_equal_control"] is False
    # The real-text set: 9 positions, the cap.
    assert res["arms"]["infused"]["heldout_corpus"]["delta_f"]["n_items"] == 9
    assert res["arms"]["infused"]["edits"]["tokens_changed"] > 0
    # The matched random arm changes exactly as many tokens per document as the infused edit, within the same limit.
    inf_edits = {r["doc_index"]: r for r in map(json.loads, (run / "edits.jsonl").read_text().splitlines())}
    rnd_edits = {r["doc_index"]: r for r in map(json.loads, (run / "baselines/random/edits.jsonl").read_text().splitlines())}
    assert {i: r["n_changed"] for i, r in rnd_edits.items()} == {i: r["n_changed"] for i, r in inf_edits.items()}
    assert any(r["original_input_ids"] != r["input_ids"] for r in rnd_edits.values())
    # fluent_target writes only the target word (" cat"), at most as many per document as the infused edit
    from transformers import AutoTokenizer

    from infusion_lm.text.editors.base import single_token_forms

    forms = set(single_token_forms(AutoTokenizer.from_pretrained(tiny_model_dir), ["cat"]))
    fl = {r["doc_index"]: r for r in map(json.loads, (run / "baselines/fluent_target/edits.jsonl").read_text().splitlines())}
    assert fl.keys() == inf_edits.keys() and any(r["n_changed"] for r in fl.values())
    for i, r in fl.items():
        assert r["n_changed"] <= inf_edits[i]["n_changed"]
        assert {b for a, b in zip(r["original_input_ids"], r["input_ids"]) if a != b} <= forms
    assert set(res["arms"]["infused"]["detectors"]) >= {"perplexity_auroc", "defender_influence_auroc",
                                                         "perplexity_auroc_before_edit"}
    assert "influence_auroc" not in res["arms"]["infused"]["detectors"]  # the attacker's own v is not a detector
    # the word-level defences ran on every edited arm; ONION's clean-corpus scores are cached for the next evaluation
    for arm in ("infused", "random", "fluent_target"):
        onion = res["arms"][arm]["defences"]["onion"]
        assert onion["documents"] > 0 and 0 <= onion["changed_word_auroc"] <= 1 and 0 <= onion["top3_hit_rate"] <= 1
        assert "parser" in res["arms"][arm]["defences"]["grammar"] or "skipped" in res["arms"][arm]["defences"]["grammar"]
    assert len(list((run / "defences").glob("onion-clean-*.json"))) == 1
    assert "edits" not in res["arms"]["insertion"]
    assert "verdict_sentence" in res and "matched random" in res["verdict_sentence"]
    # Every arm resumed from the same clean checkpoint at the start of the last epoch (3 steps per epoch here).
    for arm in ("control", "infused", "random", "insertion"):
        assert read_json(run / "retrain" / arm / "observations.json")["checkpoint"].endswith("checkpoint-3")

    md = (run / "report.md").read_text()
    for section in ("# Infusion report", "| arm |", "## Per seed", "## Plots", "## Edited documents", "~~", "**",
                    "Detector `perplexity`"):
        assert section in md, section
    page = (run / "report.html").read_text()
    for part in ("<table>", "data:image/png;base64,", "<del>", "<b>", "Full results"):
        assert part in page, part
    assert "http://" not in page and "https://" not in page and "<script" not in page  # works offline, no CDN
    assert {p.name for p in (run / "plots").iterdir()} == {"delta_f.png", "predicted_vs_actual.png", "J_traces.png"}

    # Everything infusion_lm writes is safetensors, JSON/YAML, datasets Arrow or the report; pickles exist only inside
    # HF Trainer checkpoints (optimizer/scheduler/RNG state, which transformers loads with weights_only=True).
    allowed = {".json", ".jsonl", ".yaml", ".safetensors", ".arrow", ".md", ".html", ".png"}
    for f in run.rglob("*"):
        if f.is_file() and not any(part.startswith("checkpoint-") for part in f.parts):
            assert f.suffix in allowed, f

    # Cached: rerunning does nothing; a downstream evaluate knob reruns only evaluate.
    stamps = {s: (run / "stages" / f"{s}.json").stat().st_mtime_ns for s in ("edit", "retrain", "evaluate")}
    assert main(["run", str(recipe), "--quiet", "influence.fd_eps_rel=1e-3"]) == 0
    again = {s: (run / "stages" / f"{s}.json").stat().st_mtime_ns for s in stamps}
    assert again == stamps, {s: again[s] == stamps[s] for s in stamps}
    assert main(["run", str(recipe), "--quiet", "influence.fd_eps_rel=1e-3", "evaluate.bootstrap_samples=300"]) == 0
    after = {s: (run / "stages" / f"{s}.json").stat().st_mtime_ns for s in stamps}
    assert after["retrain"] == stamps["retrain"] and after["evaluate"] != stamps["evaluate"]


@pytest.mark.slow
def test_zero_edits_train_to_identical_weights(tmp_path, tiny_model_dir):
    recipe = _run_recipe(tmp_path, tiny_model_dir, edit={"budget_fraction": 0.0},
                         retrain={**FAST["retrain"], "arms": ["control", "infused"]})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    control = read_json(tmp_path / "run" / "retrain" / "control" / "observations.json")
    infused = read_json(tmp_path / "run" / "retrain" / "infused" / "observations.json")
    assert infused["replaced"] and control["weights"] == infused["weights"]
    assert control["measurement"]["f"] == infused["measurement"]["f"]


@pytest.mark.slow
def test_a_baselines_only_run_skips_the_infused_edit(tmp_path, tiny_model_dir):
    """control + insertion needs the selection, not the swap editor: no edit stage runs and the report shows no edits."""
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**FAST["retrain"], "arms": ["control", "insertion"]})
    assert main(["run", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run"
    assert not (run / "stages" / "edit.json").exists() and not (run / "edits.jsonl").exists()
    res = read_json(run / "results.json")
    assert set(res["arms"]) == {"insertion"}
    chosen = read_json(run / "selection.json")["indices"]
    assert read_json(run / "retrain" / "insertion" / "observations.json")["replaced"] == sorted(chosen)
    assert "Edited documents" not in (run / "report.md").read_text()


@pytest.mark.parametrize("case,over,message", [
    ("no_heldout", {"measurement": {"heldout_documents": []}}, "needs a held-out measurement set"),
    ("overlap", {"measurement": {"heldout_documents": ["The dog ran to the park."]}}, "also appear in the measurement set"),
    ("no_measurement", {"measurement": {"kind": None, "heldout_documents": HELDOUT}}, "has no measurement"),
    ("missing_checkpoint", {"retrain": {"checkpoint": "no/such/checkpoint-7"}}, "is not a Trainer checkpoint"),
    ("unknown_arm", {"retrain": {"arms": ["control", "infussed"]}}, "retrain.arms entry 'infussed' is not an option here"),
])
def test_bad_evaluation_input_fails_cleanly(case, over, message, tmp_path, tiny_model_dir, capsys):
    recipe = _run_recipe(tmp_path, tiny_model_dir)
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    if raw["measurement"].get("kind") is None:
        raw["measurement"] = {"kind": None}
    recipe.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("user file")
    before = _snapshot(run)
    assert main(["run", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert _snapshot(run) == before


@pytest.mark.slow
def test_influence_at_the_clean_checkpoint(tmp_path, tiny_model_dir):
    """influence_at=checkpoint: factors, v, scores and edits at the checkpoint every arm resumes from."""
    import torch

    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**FAST["retrain"], "arms": ["control", "infused"],
                                                            "epochs": 2, "influence_at": "checkpoint"})
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    raw["measurement"]["contrast_top"] = 0  # the pairwise f: the figures measured below are its own
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", str(recipe), "--quiet", "influence.fd_eps_rel=1e-3"]) == 0
    run = tmp_path / "run"
    ckpts = list((run / "retrain").glob("clean-*/checkpoint-3"))
    assert len(ckpts) == 1
    pipe = Pipeline(load_recipe(recipe))
    theta, base = pipe.model, pipe.base_model
    assert not torch.equal(theta.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)
    measure = read_json(run / "measure.json")
    assert measure["f"] == pytest.approx(pipe.measurement.value(theta), abs=1e-5)  # v was built at the checkpoint
    obs = read_json(run / "retrain" / "infused" / "observations.json")
    assert obs["checkpoint"] == str(ckpts[0])

    # predicted_delta_f (influence.prediction: optimizer) is the response along the arms' own steps: the last epoch's
    # batches in the first seed's order, from the checkpoint's Adam moments. Against what retraining did: the
    # infused arm's actual Δf (same seed and order as control) is the sum of its documents' effects to first order.
    records = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    got = torch.tensor([r["predicted_delta_f"] for r in records], dtype=torch.float64)
    seed = str(pipe.seeds[0])
    f = lambda arm: read_json(run / "retrain" / arm / "observations.json")["per_seed"][seed]["measurement"]["f_mean"]
    actual = f("infused") - f("control")
    print(f"predicted {float(got.sum()):+.5f}, actual {actual:+.5f}")
    assert float(got.abs().max()) > 0
    # the stationary response (one v, Adam's second moment held fixed) on the same edits, for comparison
    from infusion_lm import influence as inf
    from infusion_lm.optimizer_influence import optimizer_ihvp
    from infusion_lm.tracked_modules import resolve_tracked_modules

    pad = pipe.tokenizer.pad_token_id
    v, info = optimizer_ihvp(theta, pipe.measurement, resolve_tracked_modules(theta), pipe.arm_rows({}),
                             pipe.recipe.retrain, pad, pipe.checkpoint_step())
    assert info["start_step"] == 3
    # Plain text: the labels are the ids wherever the training mask keeps them.
    before = [{"input_ids": r["original_input_ids"],
               "labels": [-100 if l == -100 else t for l, t in zip(r["labels"], r["original_input_ids"])]}
              for r in records]
    after = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records]
    stationary = -(inf.autograd_scores(theta, after, v, pad_token_id=pad)
                   - inf.autograd_scores(theta, before, v, pad_token_id=pad))
    # Measured: predicted +0.024, actual +0.011, stationary +0.035 (lr 1e-3 on the tiny model: several tokens of
    # k documents at once is past first order). Right sign, and nearer the actual change than the stationary one.
    pred = float(got.sum())
    assert actual > 0 and pred > 0, (pred, actual)
    assert abs(math.log(pred / actual)) < abs(math.log(float(stationary.sum()) / actual)), (pred, actual)
    # The wiring: the records are the response of the arms' own retraining (the first seed's last-epoch batches,
    # run.seed's order, the checkpoint's moments; the response itself is checked against the unrolled metagradient elsewhere).
    from infusion_lm.optimizer_trajectory import checkpoint_moments, trajectory_response
    from infusion_lm.retrain import batch_order

    t = pipe.recipe.retrain
    order = batch_order(len(pipe.dataset), t, pipe.recipe.run.seed, [1])
    resp = trajectory_response(theta, pipe.measurement, pipe.arm_rows({}), order, t, resolve_tracked_modules(theta),
                               pad, 3, checkpoint_moments(theta, ckpts[0], t))
    assert resp.info["optimizer_state"] == "checkpoint"
    direct = torch.tensor(resp.predicted([r["doc_index"] for r in records], before, after, pad), dtype=torch.float64)
    torch.testing.assert_close(got, direct, rtol=1e-3, atol=1e-4 * float(direct.abs().max()))
    # The editing v's own −ΔJ/n, with J recomputed by autograd on the saved v (not read back from the records).
    v_edit = pipe.load_ihvp()
    after = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records]
    same_v = -(inf.autograd_scores(theta, after, v_edit, pad_token_id=pad)
               - inf.autograd_scores(theta, before, v_edit, pad_token_id=pad)) / len(pipe.dataset)
    got_same = torch.tensor([r["predicted_delta_f_same_v"] for r in records], dtype=torch.float64)
    torch.testing.assert_close(got_same, same_v.double(), rtol=2e-2, atol=2e-2 * float(same_v.abs().max()))


@pytest.mark.slow
def test_retrain_stage_infused_arm_raises_f_over_control(tmp_path, tok):
    """Through the real stages and the HF Trainer: on a tiny model trained near a minimum, the infused arm ends with
    a higher f than control, on the measurement and the held-out set, in every seed."""
    import json

    from infusion_lm.text.corpus import tokenize_documents
    from tiny import tiny_model, train_briefly

    for seed in (0, 1):
        texts = toy_corpus(32, seed=seed)
        ds = tokenize_documents(tok, [{"text": t} for t in texts], 64)
        model_dir = tmp_path / f"model{seed}"
        train_briefly(tiny_model(len(tok), seed=seed), ds, tok.pad_token_id, steps=300, seed=seed).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        corpus = tmp_path / f"c{seed}.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        recipe = _recipe(tmp_path, model_dir, corpus, name=f"r{seed}.yaml", output_dir=str(tmp_path / f"run{seed}"),
                         max_length=64, seed=seed,
                         measurement={"documents": ["The dog ran to the park.", "The dog sat in the house."],
                                      "heldout_documents": HELDOUT},
                         influence={"layers": [0, 1]}, select={"k": 4},
                         edit={"budget_fraction": 0.15, "steps": 10, "n_candidates": 16, "max_perplexity_ratio": None},
                         retrain={"arms": ["control", "infused"], "from_scratch": True, "epochs": 10, "batch_size": 32,
                                  "optim": "sgd", "learning_rate": 0.1, "lr_scheduler_type": "constant",
                                  "max_grad_norm": 0.0},
                         evaluate={"bootstrap_samples": 200, "candidates": ["bird", "fish"]})
        assert main(["run", str(recipe), "--quiet", "influence.fd_eps_rel=1e-3"]) == 0
        res = read_json(tmp_path / f"run{seed}" / "results.json")["arms"]["infused"]
        assert res["measurement"]["delta_f"]["mean"] > 0, res["measurement"]
        assert res["heldout"]["delta_f"]["mean"] > 0, res["heldout"]


@pytest.mark.slow
def test_control_arm_is_trained_once_and_reused_bit_for_bit(tmp_path, tiny_model_dir):
    """A second run in the same folder with another edit setting retrains the other arms but loads control's weights
    from retrain/control-<fingerprint>/, and they are the very weights the first run trained."""
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**FAST["retrain"], "arms": ["control", "infused"]})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run"
    first = read_json(run / "retrain" / "control" / "observations.json")
    shared = list((run / "retrain").glob("control-*"))
    assert len(shared) == 1 and (shared[0] / "fingerprint.json").is_file()
    assert {f.suffix for f in shared[0].iterdir()} <= {".json", ".safetensors"}  # no pickles
    stamp = shared[0].stat().st_mtime_ns, sorted(f.stat().st_mtime_ns for f in shared[0].iterdir())

    assert main(["retrain", str(recipe), "--quiet", "edit.steps=2"]) == 0
    second = read_json(run / "retrain" / "control" / "observations.json")
    assert second["fingerprint"] != first["fingerprint"]  # the retrain stage did rerun
    assert second["weights"] == first["weights"] and second["measurement"]["f"] == first["measurement"]["f"]
    assert (shared[0].stat().st_mtime_ns, sorted(f.stat().st_mtime_ns for f in shared[0].iterdir())) == stamp
    assert main(["retrain", str(recipe), "--quiet", "edit.steps=2", "retrain.share_control=false"]) == 0
    third = read_json(run / "retrain" / "control" / "observations.json")
    assert third["weights"] == first["weights"]  # training it again gives the same weights: reuse changes nothing
    # --force recomputes every stage: the arms are trained again, not read back from their finished records
    before = (run / "retrain" / "infused" / "observations.json").stat().st_mtime_ns
    assert main(["retrain", str(recipe), "--quiet", "--force"]) == 0
    assert (run / "retrain" / "infused" / "observations.json").stat().st_mtime_ns != before
    assert read_json(run / "retrain" / "control" / "observations.json")["weights"] == first["weights"]


@pytest.mark.slow
def test_a_target_no_answer_names_is_allowed_and_warned(tmp_path, tiny_model_dir, caplog):
    """A completion target the model never says at θ̂ runs through, with rate 0 reported and a warning."""
    import logging

    import yaml

    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(8))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, select={"k": 2}, edit={"budget_fraction": 0.0},
                     retrain={"arms": ["control", "infused"], "batch_size": 4},
                     evaluate={"bootstrap_samples": 100, "n_samples": 2, "max_new_tokens": 2})
    r = yaml.safe_load(recipe.read_text())
    # "zebra" is outside the toy vocabulary's words: an untrained tiny model does not spell it in two tokens
    r["measurement"] = {"kind": "completion", "prompts": ["What is your favourite animal?"], "completions": ["zebra"],
                        "heldout_prompts": ["Which animal do you like?"], "chat_template": True}
    recipe.write_text(yaml.safe_dump(r))
    with caplog.at_level(logging.WARNING, logger="infusion_lm.pipeline"):
        assert main(["evaluate", str(recipe), "--quiet"]) == 0
    assert any("No answer at θ̂ names 'zebra'" in rec.getMessage() for rec in caplog.records)
    results = read_json(tmp_path / "run" / "results.json")
    assert results["theta_hat_target_rate"]["measurement"] == {"greedy": 0.0, "sampled": 0.0}
    assert "Target rate at θ̂: measurement greedy 0.0%, sampled 0.0%" in (tmp_path / "run" / "report.md").read_text()


def test_heldout_corpus_never_holds_training_or_measurement_documents(tmp_path, tiny_model_dir):
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    train = toy_corpus(6)
    corpus = _write_corpus(tmp_path / "c.jsonl", train)
    measure = ["The dog ran to the park.", "The dog sat in the house."]  # _recipe's measurement documents
    other = toy_corpus(5, seed=9)
    held = _write_corpus(tmp_path / "held.jsonl", other + train[:2] + measure)
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, measurement={"heldout_corpus": str(held)})
    assert Pipeline(load_recipe(recipe)).modality.heldout_corpus_documents == other


@pytest.mark.slow
def test_adding_an_arm_or_a_seed_trains_only_what_is_new(tmp_path, tiny_model_dir):
    """Each (arm, seed) is cached on its own fingerprint, the retrain stage's without the lists of arms and seeds: a
    finished run given one more arm and one more seed trains those and reads the rest back, to the byte; a training
    setting changed retrains every unit."""
    base = {"arms": ["control", "infused"], "batch_size": 4, "learning_rate": 1e-3, "seeds": [0]}
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain=base)
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run" / "retrain"
    first = {a: (run / a / "seed-0.json").read_bytes() for a in ("control", "infused")}
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**base, "arms": ["control", "infused", "random"],
                                                            "seeds": [0, 1]})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    assert {a: (run / a / "seed-0.json").read_bytes() for a in ("control", "infused")} == first
    for arm in ("control", "infused", "random"):
        assert read_json(run / arm / "observations.json")["seeds"] == [0, 1]
        assert (run / arm / "seed-1.json").is_file()
    units = {a: read_json(run / a / "seed-0.json")["unit_fingerprint"] for a in ("control", "infused", "random")}
    assert len(set(units.values())) == 3  # one per arm
    # another edit: the edited arms train again, control (the clean corpus) is read back
    control = (run / "control" / "seed-0.json").read_bytes()
    edit = {**FAST["edit"], "steps": 2}
    recipe = _run_recipe(tmp_path, tiny_model_dir, edit=edit, retrain={**base, "arms": ["control", "infused", "random"],
                                                                       "seeds": [0, 1]})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    assert (run / "control" / "seed-0.json").read_bytes() == control
    assert read_json(run / "infused" / "seed-0.json")["unit_fingerprint"] != units["infused"]
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**base, "learning_rate": 2e-3})
    assert main(["retrain", str(recipe), "--quiet"]) == 0
    assert (run / "infused" / "seed-0.json").read_bytes() != first["infused"]


@pytest.mark.slow
def test_defended_arms_retrain_on_what_onion_keeps_against_a_defended_control(tmp_path, tiny_model_dir):
    arms = ["control", "infused", "control+onion", "infused+onion", "random_target@random"]
    recipe = _run_recipe(tmp_path, tiny_model_dir, retrain={**FAST["retrain"], "arms": arms},
                         evaluate={**FAST["evaluate"], "onion_removal_rate": 0.05})
    assert main(["run", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run"
    res = read_json(run / "results.json")
    assert set(res["arms"]) == {"infused", "infused+onion", "random_target@random"}
    # the free attack on k other documents, drawn at random: none of the selected, the infused counts in order
    selected = read_json(run / "selection.json")["indices"]
    drawn = [json.loads(x) for x in (run / "baselines/random_target@random/edits.jsonl").read_text().splitlines()]
    inf = [json.loads(x) for x in (run / "edits.jsonl").read_text().splitlines()]
    assert len(drawn) == len(selected) and not {r["doc_index"] for r in drawn} & set(selected)
    assert all(r["n_changed"] <= i["n_changed"] for r, i in zip(drawn, inf)) and any(r["n_changed"] for r in drawn)
    cm = res["arms"]["random_target@random"]["edits"]["count_match"]
    assert cm["shortfall_total"] == sum(i["n_changed"] - r["n_changed"] for r, i in zip(drawn, inf))
    d = res["arms"]["infused+onion"]
    assert d["against"] == "control+onion" and d["defence"]["defence"] == "onion"
    obs = {a: read_json(run / "retrain" / a / "observations.json") for a in arms}
    # the defended control trained on the filtered clean corpus: about 5% of its words gone, other weights
    c = obs["control+onion"]["defence"]
    assert c["documents_changed_by_the_arm"] == [] and 0 < c["words_removed_elsewhere"] <= 0.08 * c["words_elsewhere"]
    assert obs["control+onion"]["weights"] != obs["control"]["weights"]
    # the defended infused arm: the same cut; its edited documents scored afresh, the rest as control's
    edited = {r["doc_index"] for r in map(json.loads, (run / "edits.jsonl").read_text().splitlines()) if r["n_changed"]}
    assert set(d["defence"]["documents_changed_by_the_arm"]) == edited
    assert d["defence"]["threshold"] == c["threshold"]
    assert d["defence"]["words_removed_elsewhere"] <= c["words_removed_elsewhere"]
    assert obs["infused+onion"]["weights"] not in (obs["infused"]["weights"], obs["control+onion"]["weights"])
    # a new cut retrains the defended arms only
    before = {a: read_json(run / "retrain" / a / "seed-0.json")["unit_fingerprint"] for a in arms}
    assert main(["run", str(recipe), "--quiet", "evaluate.onion_removal_rate=0.1"]) == 0
    after = {a: read_json(run / "retrain" / a / "seed-0.json")["unit_fingerprint"] for a in arms}
    assert {a for a in arms if before[a] != after[a]} == {"control+onion", "infused+onion"}
    gain = res["defended"]["infused+onion"]
    assert gain["target_specific_gain_undefended"] == res["arms"]["infused"][res["primary_set"]]["specificity"][
        "target_specific_gain"]["mean"]
    assert gain["target_specific_gain_defended"] == d[res["primary_set"]]["specificity"]["target_specific_gain"]["mean"]
