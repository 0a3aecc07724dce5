"""The CLI end to end on a tiny saved model: outputs, stage caching, and bad input that must lose nothing."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from infusion_lm.cli import main
from infusion_lm.atomic_io import read_json, read_tensors
from tiny import snapshot as _snapshot, toy_corpus, write_corpus as _write_corpus, write_recipe as _recipe


@pytest.mark.slow
def test_score_end_to_end_and_caching(tmp_path, tiny_model_dir, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus)
    assert main(["score", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "ihvp.safetensors", "scores.safetensors", "selection.json", "measure.json"):
        assert (run / name).is_file(), name
    assert (run / "factors" / "factors_ekfac").is_dir()

    ihvp = read_tensors(run / "ihvp.safetensors")
    assert sorted(ihvp) == sorted(f"model.layers.1.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert ihvp["model.layers.1.mlp.down_proj"].shape == (32, 64)  # out × in (no bias)
    scores = read_tensors(run / "scores.safetensors")["scores"]
    assert scores.shape == (12,)
    sel = read_json(run / "selection.json")
    assert sel["k"] == 3 and len(sel["indices"]) == 3
    assert sel["indices"] == torch.argsort(scores)[:3].tolist()
    assert sel["scores"] == sorted(sel["scores"]) and "most negative" in sel["sign_convention"]
    assert yaml.safe_load((run / "config.yaml").read_text())["select"]["k"] == 3

    # Everything cached: nothing is rewritten.
    before = _snapshot(run)
    assert main(["score", str(recipe), "--quiet"]) == 0
    assert _snapshot(run) == {**before, "config.yaml": _snapshot(run)["config.yaml"]}

    # A downstream change (k) recomputes only the selection; an upstream one (damping) keeps the factors.
    fit_rec = (run / "stages" / "fit.json").stat().st_mtime_ns
    score_rec = (run / "stages" / "score.json").stat().st_mtime_ns
    assert main(["score", str(recipe), "select.k=5", "--quiet"]) == 0
    assert len(read_json(run / "selection.json")["indices"]) == 5
    assert (run / "stages" / "score.json").stat().st_mtime_ns == score_rec
    assert main(["score", str(recipe), "influence.damping=0.01", "--quiet"]) == 0
    assert (run / "stages" / "fit.json").stat().st_mtime_ns == fit_rec
    assert (run / "stages" / "score.json").stat().st_mtime_ns != score_rec


BAD_CASES = {
    "empty_corpus": (lambda tmp, model: _recipe(tmp, model, _write_corpus(tmp / "e.jsonl", ["", "  "])),
                     "holds no documents"),
    "k_exceeds_n": (lambda tmp, model: _recipe(tmp, model, _write_corpus(tmp / "c.jsonl", toy_corpus(4)),
                                               select={"k": 9}), "exceeds the corpus size"),
    "probe_absent": (lambda tmp, model: _recipe(tmp, model, _write_corpus(tmp / "c.jsonl", toy_corpus(6)),
                                                measurement={"probe": "zebra"}), "occurs in none"),
    "model_missing": (lambda tmp, model: _recipe(tmp, tmp / "no_such_model", _write_corpus(tmp / "c.jsonl", toy_corpus(6))),
                      "Could not resolve model"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_cleanly_and_writes_nothing(case, tmp_path, tiny_model_dir, capsys):
    build, message = BAD_CASES[case]
    recipe = build(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("user file")
    before = _snapshot(run)
    assert main(["score", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert _snapshot(run) == before


@pytest.mark.slow
def test_factors_from_a_different_model_are_caught(tmp_path, tiny_model_dir, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(8))
    recipe = _recipe(tmp_path, model_dir, corpus)
    assert main(["fit", str(recipe), "--quiet"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(model_dir)  # same path, different weights
    before = _snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["score", str(recipe), "--quiet"]) == 2
    assert "different model" in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_run_folder_of_another_recipe_is_refused(tmp_path, tiny_model_dir, capsys):
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(8))
    other = _write_corpus(tmp_path / "d.jsonl", toy_corpus(8, seed=5))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus)
    assert main(["fit", str(recipe), "--quiet"]) == 0
    before = _snapshot(tmp_path / "run")
    assert main(["fit", str(recipe), f"corpus={other}", "--quiet"]) == 2
    assert "belongs to a different recipe" in capsys.readouterr().err
    assert _snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_console_entry_point_exit_code(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nselct:\n  k: 3\n")
    proc = subprocess.run([sys.executable, "-m", "infusion_lm", "score", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Unknown recipe key `selct`. Did you mean `select`?" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_corrupted_factors_long_documents_and_blank_lines(tmp_path, tiny_model_dir, capsys):
    # Blank lines in a JSONL corpus are skipped, blank documents dropped.
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": t}) for t in toy_corpus(10)]
    corpus.write_text("\n".join(lines[:5]) + "\n\n   \n" + json.dumps({"text": "  "}) + "\n" + "\n".join(lines[5:]) + "\n")
    recipe = _recipe(tmp_path, tiny_model_dir, corpus)
    assert main(["score", str(recipe), "--quiet"]) == 0
    assert read_tensors(tmp_path / "run" / "scores.safetensors")["scores"].shape == (10,)

    # A truncated factor file: a clear error, and nothing in the run folder changes.
    fdir = tmp_path / "run" / "factors" / "factors_ekfac"
    victim = next(fdir.glob("*lambda*.safetensors"))  # needed by the EK-FAC preconditioner
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["score", str(recipe), "--quiet", "influence.damping=0.01"]) == 2
    err = capsys.readouterr().err
    assert "are missing or corrupted" in err and "Traceback" not in err
    assert _snapshot(tmp_path / "run") == before

    # Documents longer than max_length: truncated with a warning by default, refused with long_documents: fail.
    strict = _recipe(tmp_path, tiny_model_dir, corpus, name="strict.yaml", output_dir=str(tmp_path / "strict"),
                     max_length=12, long_documents="fail")
    assert main(["score", str(strict), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "longer than max_length=12" in err and "long_documents: truncate" in err
    assert not (tmp_path / "strict").exists()
