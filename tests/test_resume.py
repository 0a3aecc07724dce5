"""A run killed with SIGKILL in the middle of a stage resumes from its last finished stage and ends with the same
outputs as a run that was never interrupted."""

import json
import os
import subprocess
import sys
import textwrap

import torch
import yaml

from infusion_lm.storage import read_json, read_tensors
from tiny import toy_corpus

KILL_DURING_SCORE = textwrap.dedent("""
    import os, signal, sys
    import infusion_lm.pipeline as p
    from infusion_lm.storage import atomic_path

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
