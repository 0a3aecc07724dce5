"""Every stage's cache fingerprint covers every recipe setting the stage reads: a setting read while a stage runs but
absent from its fingerprint would let a changed recipe reuse a stale output."""

import dataclasses
from contextlib import contextmanager

import pytest

from infusion_lm import config as C
from infusion_lm.config import load_recipe
from infusion_lm.pipeline import Pipeline

SECTIONS = {C.RunArguments: "run", C.MeasurementArguments: "measurement", C.InfluenceArguments: "influence",
            C.SelectArguments: "select", C.SynthesizeArguments: "synthesize", C.EditArguments: "edit",
            C.RetrainArguments: "retrain", C.EvaluateArguments: "evaluate"}


@contextmanager
def recording():
    """The recipe settings ("section.field") read inside the block, by any code."""
    reads = set()
    for cls, section in SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}

        def get(self, attr, _section=section, _names=names):
            if attr in _names:
                reads.add(f"{_section}.{attr}")
            return object.__getattribute__(self, attr)

        cls.__getattribute__ = get
    try:
        yield reads
    finally:
        for cls in SECTIONS:
            del cls.__getattribute__


def stage_reads(recipe_path, monkeypatch) -> dict:
    used = {}
    original = Pipeline._stage

    def stage(self, name, fn):
        def recorded():
            with recording() as reads:
                fn()
            used[name] = set(reads)
        return original(self, name, recorded)

    monkeypatch.setattr(Pipeline, "_stage", stage)
    Pipeline(load_recipe(recipe_path), progress=False).run("evaluate")
    monkeypatch.setattr(Pipeline, "_stage", original)
    return used


def declared(recipe_path, stage: str) -> set:
    pipe = Pipeline(load_recipe(recipe_path), progress=False)
    with recording() as reads:
        pipe._fp(stage)
    return reads


def test_recording_sees_reads(tmp_path):
    r = C.EditArguments()
    with recording() as reads:
        _ = r.steps, dataclasses.asdict(C.SelectArguments())
    assert reads == {"edit.steps", "select.k"}
    assert "__getattribute__" not in vars(C.EditArguments)  # restored


# Settings that change how a stage computes, never what it writes (up to floating-point rounding of a batch split):
# where it runs, how many rows go through at once, progress output.
NO_EFFECT = {"run.device", "run.output_dir", "run.trust_remote_code", "run.long_documents",
             "influence.batch_size", "edit.doc_batch_size", "edit.score_batch_size"}


@pytest.mark.parametrize("variant", [{}, {"influence": {"preconditioner": "optimizer"},
                                         "retrain": {"epochs": 2, "influence_at": "checkpoint"}}],
                         ids=["factors at the model", "optimizer at the checkpoint"])
def test_every_stage_fingerprints_what_it_reads(tmp_path, tiny_model_dir, monkeypatch, variant):
    import yaml

    from test_cli import _write_corpus
    from tiny import toy_corpus

    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    path = tmp_path / "r.yaml"
    raw = {
        "model": str(tiny_model_dir), "corpus": str(corpus), "max_length": 48, "output_dir": str(tmp_path / "run"),
        "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat",
                        "documents": ["The dog ran to the park."], "heldout_documents": ["A dog sat by the door."]},
        "influence": {"layers": [1], "batch_size": 4}, "select": {"k": 3},
        "edit": {"steps": 2, "n_candidates": 4},
        "retrain": {"arms": ["control", "infused", "random"], "epochs": 1, "batch_size": 4},
        "evaluate": {"bootstrap_samples": 100, "detectors": False}}
    for section, values in variant.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    used = stage_reads(path, monkeypatch)
    assert set(used) >= {"measure", "score", "select", "edit", "retrain", "evaluate"}
    stale = {stage: sorted(reads - declared(path, stage) - NO_EFFECT) for stage, reads in used.items()}
    stale = {s: keys for s, keys in stale.items() if keys}
    assert not stale, "read but not fingerprinted: " + "; ".join(f"{s}: {', '.join(k)}" for s, k in stale.items())
