"""A run killed with SIGKILL in the middle of a stage resumes from its last finished stage and ends with the same
outputs as a run that was never interrupted."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from infusion_lm.atomic_io import read_json, read_tensors
from tiny import toy_corpus

KILL_DURING_SCORE = textwrap.dedent("""
    import os, signal, sys
    import infusion_lm.pipeline as p
    from infusion_lm.atomic_io import atomic_path

    def dying_write(path, tensors, metadata=None):
        with atomic_path(path) as tmp:      # a half-written temporary file, then SIGKILL before the rename
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)

    original = p.Pipeline.measure
    def measure_then_arm(self):
        out = original(self)
        if self.is_current("measure"):
            p.write_tensors = dying_write   # only the score stage's write dies
        return out
    p.Pipeline.measure = measure_then_arm
    from infusion_lm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _recipe(tmp_path, model_dir, corpus, out):
    p = tmp_path / f"{out}.yaml"
    p.write_text(yaml.safe_dump({
        "model": str(model_dir), "corpus": str(corpus), "max_length": 48, "output_dir": str(tmp_path / out),
        "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat", "documents": ["The dog ran to the park."]},
        "influence": {"layers": [1], "batch_size": 4}, "select": {"k": 3}}))
    return p


def _cli(args, script=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "infusion_lm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume(tmp_path, tiny_model_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_corpus(10)))
    killed = _recipe(tmp_path, tiny_model_dir, corpus, "killed")
    clean = _recipe(tmp_path, tiny_model_dir, corpus, "clean")

    proc = _cli(["score", str(killed), "--quiet"], script=KILL_DURING_SCORE)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "killed"
    assert (run / "stages" / "measure.json").is_file()
    assert not (run / "scores.safetensors").exists()  # the half-written file never took the real name
    assert not (run / "stages" / "score.json").exists()
    fit_record = (run / "stages" / "fit.json").read_text()
    ihvp_mtime = (run / "ihvp.safetensors").stat().st_mtime_ns

    proc = _cli(["score", str(killed), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cached" in proc.stderr  # fit and measure were not recomputed
    assert (run / "stages" / "fit.json").read_text() == fit_record
    assert (run / "ihvp.safetensors").stat().st_mtime_ns == ihvp_mtime
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    assert _cli(["score", str(clean), "--quiet"]).returncode == 0
    resumed = read_tensors(run / "scores.safetensors")["scores"]
    fresh = read_tensors(tmp_path / "clean" / "scores.safetensors")["scores"]
    assert torch.equal(resumed, fresh)
    assert read_json(run / "selection.json") == read_json(tmp_path / "clean" / "selection.json")


KILL_INSIDE_STAGE = textwrap.dedent("""
    import os, signal, sys
    import infusion_lm.pipeline as p
    import infusion_lm.retrain_stage as retrain_stage

    target = os.environ["KILL_STAGE"]
    if target == "retrain":
        # die mid-stage: right after the first arm's observations are written, before the second arm trains
        original_write = retrain_stage.write_json
        def dying_write(path, obj):
            original_write(path, obj)
            if str(path).endswith(os.path.join("control", "seed-0.json")):
                os.kill(os.getpid(), signal.SIGKILL)
        retrain_stage.write_json = dying_write
    else:
        # die after the stage's work, before it is recorded as finished: its outputs exist but must not be trusted
        original_stage = p.Pipeline._stage
        def dying_stage(self, stage, fn):
            if stage == target:
                def fn_then_die():
                    fn()
                    os.kill(os.getpid(), signal.SIGKILL)
                return original_stage(self, stage, fn_then_die)
            return original_stage(self, stage, fn)
        p.Pipeline._stage = dying_stage
    from infusion_lm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _full_recipe(tmp_path, model_dir, corpus, out):
    p = _recipe(tmp_path, model_dir, corpus, out)
    raw = yaml.safe_load(p.read_text())
    raw["measurement"]["heldout_documents"] = ["A dog sat by the door."]
    raw["edit"] = {"steps": 2, "n_candidates": 4}
    raw["retrain"] = {"arms": ["control", "infused"], "epochs": 1, "batch_size": 4}
    raw["evaluate"] = {"bootstrap_samples": 100, "detectors": False}
    p.write_text(yaml.safe_dump(raw))
    return p


def _outputs(run):
    import datasets

    corpus = datasets.load_from_disk(str(run / "infused_corpus")).to_list()
    results = json.loads((run / "results.json").read_text())
    return corpus, read_tensors(run / "scores.safetensors")["scores"], results["arms"]




@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    corpus = tmp / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_corpus(10)))
    proc = _cli(["run", str(_full_recipe(tmp, tiny_model_dir, corpus, "clean")), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return corpus, _outputs(tmp / "clean")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fit", "edit", "retrain", "evaluate"])
def test_sigkill_inside_any_stage_resumes_to_the_same_outputs(tmp_path, tiny_model_dir, uninterrupted, stage):
    corpus, (clean_corpus, clean_scores, clean_arms) = uninterrupted
    recipe = _full_recipe(tmp_path, tiny_model_dir, corpus, "killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_STAGE": stage}
    proc = subprocess.run([sys.executable, "-c", KILL_INSIDE_STAGE, "run", str(recipe), "--quiet"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "killed"
    assert not (run / "stages" / f"{stage}.json").exists()  # the killed stage is not recorded as finished
    before = {s: (run / "stages" / f"{s}.json").read_text() for s in ("fit", "measure", "score", "select", "edit")
              if (run / "stages" / f"{s}.json").is_file()}

    control_obs = run / "retrain" / "control" / "seed-0.json"
    control_mtime = control_obs.stat().st_mtime_ns if control_obs.is_file() else None
    proc = _cli(["run", str(recipe), "--quiet"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for s, record in before.items():  # finished stages were not recomputed
        assert (run / "stages" / f"{s}.json").read_text() == record, s
    corpus_rows, scores, arms = _outputs(run)
    assert torch.equal(scores, clean_scores)
    assert corpus_rows == clean_corpus  # the same infused corpus, token for token
    for arm in clean_arms:
        assert arms[arm]["measurement"]["delta_f"] == clean_arms[arm]["measurement"]["delta_f"]
        assert arms[arm]["heldout"]["delta_f"] == clean_arms[arm]["heldout"]["delta_f"]
    if stage == "retrain":  # the control arm finished before the kill; the resumed run reused it
        assert (run / "retrain" / "control" / "seed-0.json").stat().st_mtime_ns == control_mtime
    assert not [p for p in run.rglob("*.tmp")]


def test_corpus_fingerprint_follows_the_bytes_not_the_file_time(tmp_path, tiny_model_dir):
    """A fresh copy of the same corpus (new mtime) reuses the run folder's stages; edited contents never do."""
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy_corpus(10)))
    raw = yaml.safe_load(_recipe(tmp_path, tiny_model_dir, corpus, "run").read_text())

    def corpus_fp():
        return Pipeline(load_recipe(raw=raw), progress=False).stage_fingerprint("corpus")

    before = corpus_fp()
    os.utime(corpus, ns=(1_000_000_000, 1_000_000_000))
    assert corpus_fp() == before
    corpus.write_text(corpus.read_text().replace("dog", "cow", 1))
    assert corpus_fp() != before
