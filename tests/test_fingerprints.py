"""Every stage's cache fingerprint covers every recipe setting the stage reads: a setting read while a stage runs but
absent from its fingerprint would let a changed recipe reuse a stale output."""

import dataclasses
from contextlib import contextmanager

import pytest

from infusion_lm import config as C
from infusion_lm.config import load_recipe
from infusion_lm.pipeline import Pipeline
from infusion_lm.text import config as T


@contextmanager
def recording(modality: str = "text"):
    """The recipe settings ("section.field") read inside the block, by any code, on the classes a ``modality``
    recipe's sections are read into."""
    reads, classes = set(), {}
    for section, cls in C.recipe_sections(modality).items():
        classes.setdefault(cls, section)
    for cls, section in classes.items():
        names = {f.name for f in dataclasses.fields(cls)}

        def get(self, attr, _section=section, _names=names):
            if attr in _names:
                reads.add(f"{_section}.{attr}")
            return object.__getattribute__(self, attr)

        cls.__getattribute__ = get
    try:
        yield reads
    finally:
        for cls in classes:
            del cls.__getattribute__


def stage_reads(recipe_path, monkeypatch) -> dict:
    used = {}
    original = Pipeline._stage

    def stage(self, name, fn):
        def recorded():
            with recording(self.recipe.run.modality) as reads:
                fn()
            used[name] = set(reads)
        return original(self, name, recorded)

    monkeypatch.setattr(Pipeline, "_stage", stage)
    Pipeline(load_recipe(recipe_path), progress=False).run("evaluate")
    monkeypatch.setattr(Pipeline, "_stage", original)
    return used


def declared(recipe_path, stage: str) -> set:
    """What the stage table says a stage's fingerprint covers (through its needs and inputs too)."""
    from infusion_lm.stages import declared_settings

    return declared_settings(Pipeline(load_recipe(recipe_path), progress=False), stage)


def test_recording_sees_reads(tmp_path):
    r = T.EditArguments()
    with recording() as reads:
        _ = r.steps, r.topk, dataclasses.asdict(C.SelectArguments())
    assert reads == {"edit.steps", "edit.topk", "select.k", "select.rank_by", "select.pool"}
    assert "__getattribute__" not in vars(T.EditArguments)  # restored
    from infusion_lm.vision.config import ImageEditArguments

    image, text = ImageEditArguments(), T.EditArguments()
    with recording("image") as reads:
        _ = image.linf, text.topk  # a text class is not an image recipe's
    assert reads == {"edit.linf"}


# Settings that change how a stage computes, never what it writes (up to floating-point rounding of a batch split):
# where it runs, how many rows go through at once, progress output.
NO_EFFECT = {"run.device", "run.output_dir", "run.trust_remote_code", "run.long_documents",
             "influence.batch_size", "edit.doc_batch_size", "edit.score_batch_size"}


@pytest.mark.parametrize("variant", [{}, {"influence": {"preconditioner": "optimizer"},
                                         "retrain": {"epochs": 2, "influence_at": "checkpoint"}},
                                     {"select": {"rank_by": "first_step", "pool": 6}}],
                         ids=["factors at the model", "optimizer at the checkpoint", "selected by the first step"])
@pytest.mark.slow
def test_every_stage_fingerprints_what_it_reads(tmp_path, tiny_model_dir, monkeypatch, variant):
    import yaml

    from tiny import write_corpus as _write_corpus
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


@pytest.mark.slow
def test_every_image_stage_fingerprints_what_it_reads(tmp_path, monkeypatch):
    """The image modality's sections go through the same check: its own keys (validation_size, linf, the held-out
    probes) must be declared where they are read."""
    import yaml

    raw = {"modality": "image", "model": "cnn", "corpus": "digits", "validation_size": 150,
           "output_dir": str(tmp_path / "run"),
           "measurement": {"kind": "class_logp", "probe_indices": [0], "heldout_probe_indices": [1, 2],
                           "target_class": "3"},
           "influence": {"batch_size": 64}, "select": {"k": 5}, "edit": {"linf": 0.1, "steps": 3},
           "retrain": {"arms": ["control", "infused", "random"], "epochs": 2, "influence_at": "checkpoint",
                       "optim": "sgd", "learning_rate": 0.05, "batch_size": 32, "max_grad_norm": 0},
           "evaluate": {"bootstrap_samples": 100, "detectors": False}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    used = stage_reads(path, monkeypatch)
    assert set(used) >= {"fit", "measure", "score", "select", "edit", "retrain", "evaluate"}
    assert "edit.linf" in used["edit"]
    stale = {stage: sorted(reads - declared(path, stage) - NO_EFFECT) for stage, reads in used.items()}
    stale = {s: keys for s, keys in stale.items() if keys}
    assert not stale, "read but not fingerprinted: " + "; ".join(f"{s}: {', '.join(k)}" for s, k in stale.items())
    # the field flags of the image sections: held-out probes are observed after retraining, not part of v; another
    # architecture for the arms moves their control, not θ̂
    recipe = load_recipe(path)
    for change, moves, stays in [({"measurement": {"heldout_probe_indices": [4]}}, ["retrain"], ["measure", "edit"]),
                                 ({"retrain": {"model": "resnet_tiny"}}, ["control", "retrain"], ["checkpoint", "edit"])]:
        changed = load_recipe(raw={**raw, **{k: {**raw[k], **v} for k, v in change.items()}})
        a, b = Pipeline(recipe, progress=False), Pipeline(changed, progress=False)
        for stage in moves:
            assert a.stage_fingerprint(stage) != b.stage_fingerprint(stage), f"{change} should move {stage}"
        for stage in stays:
            assert a.stage_fingerprint(stage) == b.stage_fingerprint(stage), f"{change} should leave {stage}"


def _variants(tmp_path, tiny_model_dir):
    from tiny import write_corpus as _write_corpus
    from tiny import toy_corpus

    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    base = {"model": str(tiny_model_dir), "corpus": str(corpus), "max_length": 48, "output_dir": str(tmp_path / "run"),
            "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat",
                            "documents": ["The dog ran to the park."]},
            "influence": {"layers": [1]}, "select": {"k": 3}, "retrain": {"arms": ["control", "infused"]}}
    optimizer = {**base, "influence": {"layers": [1], "preconditioner": "optimizer", "prediction": "optimizer"},
                 "retrain": {"arms": ["control", "infused"], "epochs": 2, "influence_at": "checkpoint"}}
    return {"factors": base, "optimizer": optimizer}


def test_stage_table_names_real_settings_and_stages(tmp_path, tiny_model_dir):
    """Every setting the table declares is a recipe field, every need is a row above it, and every stage writes
    something (a stage with no outputs could never be current)."""
    from infusion_lm.stages import BY_NAME, INPUT_SETTINGS, TABLE, section_fields

    for raw in _variants(tmp_path, tiny_model_dir).values():
        pipe = Pipeline(load_recipe(raw=raw), progress=False)
        order = [s.name for s in TABLE]
        for st in TABLE:
            for key in st.resolve("settings", pipe):
                section, _, field = key.partition(".")
                assert not field or field in section_fields(pipe.recipe, section), f"{st.name}: {key} is no recipe setting"
            for need in st.resolve("needs", pipe):
                assert order.index(need) < order.index(st.name), f"{st.name} needs {need}, which comes later"
            assert set(st.resolve("inputs", pipe)) <= set(INPUT_SETTINGS)
            if st.step:
                assert st.outputs(pipe), st.name
        assert BY_NAME["edit"].resolve("needs", pipe)[0] == "select"


@pytest.mark.parametrize("change, moves, stays", [
    # a clean-run setting: θ̂ moves, so everything computed at θ̂ moves with it (at the checkpoint)
    ({"retrain": {"learning_rate": 3e-4}}, ["checkpoint", "fit", "measure", "edit", "retrain"], []),
    # which arms run, and how many seeds, do not change θ̂ or the edits
    ({"retrain": {"seeds": [0, 1]}}, ["retrain", "evaluate"], ["checkpoint", "fit", "select", "edit"]),
    ({"select": {"k": 2}}, ["select", "edit", "retrain"], ["score", "checkpoint"]),
    ({"evaluate": {"bootstrap_samples": 200}}, ["evaluate"], ["retrain", "edit"]),
    ({"evaluate": {"candidates": ["bird"]}}, ["retrain", "evaluate"], ["edit"]),
    ({"measurement": {"heldout_documents": ["A dog sat."]}}, ["retrain"], ["measure", "score", "edit"]),
    ({"influence": {"damping_scale": 10.0}}, ["measure", "score", "edit"], ["fit", "checkpoint"]),
    ({"edit": {"steps": 3}}, ["edit", "retrain"], ["select"]),
])
def test_fingerprints_follow_the_declared_settings(tmp_path, tiny_model_dir, change, moves, stays):
    """A setting a stage declares moves its fingerprint and everything below; one it does not declare leaves it."""
    raw = _variants(tmp_path, tiny_model_dir)["factors"]
    raw["retrain"] = {"arms": ["control", "infused"], "epochs": 2, "influence_at": "checkpoint"}
    changed = {**raw, **{s: {**raw.get(s, {}), **v} for s, v in change.items()}}
    a = Pipeline(load_recipe(raw=raw), progress=False)
    b = Pipeline(load_recipe(raw=changed), progress=False)
    for stage in moves:
        assert a.stage_fingerprint(stage) != b.stage_fingerprint(stage), f"{change} should move {stage}"
    for stage in stays:
        assert a.stage_fingerprint(stage) == b.stage_fingerprint(stage), f"{change} should leave {stage}"
