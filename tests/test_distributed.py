"""`accelerate launch` with two CPU processes (gloo) gives the same factors, scores, selection and infused corpus as
one process. (kronfluence distributes only over CUDA processes, so on CPU rank 0 fits and scores while rank 1 waits.)"""

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from infusion_lm.cli import main
from infusion_lm.influence import load_factors
from infusion_lm.atomic_io import read_json, read_tensors
from tiny import write_corpus as _write_corpus, write_recipe as _recipe
from tiny import toy_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model_dir):
    """The whole run: the same factors, scores, selection, infused corpus, and, with retrain.batch_size the global
    batch, the same retraining (to the rounding of a reduction in another order)."""
    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    edit = {"budget_fraction": 0.15, "steps": 4, "n_candidates": 8, "max_perplexity_ratio": None}
    extra = {"measurement": {"heldout_documents": ["The dog looked at the lake. The dog was happy."]},
             "retrain": {"arms": ["control", "infused"], "batch_size": 4, "learning_rate": 1e-3, "max_grad_norm": 0.0},
             "evaluate": {"bootstrap_samples": 200, "candidates": ["bird"], "detectors": False}}
    one = _recipe(tmp_path, tiny_model_dir, corpus, name="one.yaml", output_dir=str(tmp_path / "one"), edit=edit, **extra)
    two = _recipe(tmp_path, tiny_model_dir, corpus, name="two.yaml", output_dir=str(tmp_path / "two"), edit=edit, **extra)
    assert main(["run", str(one), "--quiet", "influence.fd_eps_rel=1e-3"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "infusion_lm", "run",
                           str(two), "--quiet", "influence.fd_eps_rel=1e-3"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("outputs in") == 1  # two ranks ran, rank 0 reported
    a, b = tmp_path / "one", tmp_path / "two"

    fa = load_factors(a / "factors" / "factors_ekfac")[1]
    fb = load_factors(b / "factors" / "factors_ekfac")[1]
    for name in fa:
        for module in fa[name]:
            assert torch.allclose(fa[name][module], fb[name][module], rtol=1e-4, atol=1e-6), (name, module)
    sa, sb = read_tensors(a / "scores.safetensors")["scores"], read_tensors(b / "scores.safetensors")["scores"]
    assert torch.allclose(sa, sb, rtol=1e-3, atol=1e-4)
    assert read_json(a / "selection.json")["indices"] == read_json(b / "selection.json")["indices"]
    ca = datasets.load_from_disk(str(a / "infused_corpus"))
    cb = datasets.load_from_disk(str(b / "infused_corpus"))
    assert ca["input_ids"] == cb["input_ids"] and ca["text"] == cb["text"]
    # Retraining: two processes with half the global batch each train on the same batches as one process.
    for arm in ("control", "infused"):
        oa = read_json(a / "retrain" / arm / "observations.json")
        ob = read_json(b / "retrain" / arm / "observations.json")
        for s in ("measurement", "heldout"):
            assert oa[s]["f"] == pytest.approx(ob[s]["f"], rel=1e-3, abs=1e-4), (arm, s)
    ra, rb = read_json(a / "results.json"), read_json(b / "results.json")
    assert ra["arms"]["infused"]["heldout"]["delta_f"]["mean"] == pytest.approx(
        rb["arms"]["infused"]["heldout"]["delta_f"]["mean"], abs=1e-4)
    # Rank 0 wrote everything, once: no stray temporaries, the same files on both sides.
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*")
                             if p.is_file() and "factors" not in p.parts and "trainer" not in p.parts
                             and not any(q.startswith("clean-") for q in p.parts))
    assert files(a) == files(b)
