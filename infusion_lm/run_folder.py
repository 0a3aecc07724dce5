"""Every path a run reads or writes, named once.

    output_dir/
        config.yaml            the resolved recipe
        corpus.jsonl           the synthesised corpus (corpus: synthetic only)
        heldout_corpus.json    stories written for evaluation only (measurement.heldout_corpus: synthetic)
        factors/               kronfluence's own factor (and score) folders
        ihvp.safetensors       v, one tensor per tracked module
        measure.json           f(θ̂), the norms, the measurement and the damping
        optimizer_stats.safetensors   the optimizer's gradient statistics (influence.preconditioner: optimizer)
        scores.safetensors     J(z) of every document
        selection.json         the k documents with the most negative J
        infused/ edits.jsonl infused_corpus/     the infused arm's edits (an EditFolder)
        baselines/<arm>/       the same three for each edited baseline, plus its cache fingerprint.json
        retrain/clean-<fp>/    the clean checkpoint the arms resume from
        retrain/control-<fp>-seed<s>/   a control shared between recipes (retrain.share_control)
        retrain/<arm>/seed-<s>.json, observations.json, trainer/    each arm's retraining and behaviour
        retrain/summary.json
        results.json report.md report.html plots/
        stages/<stage>.json    fingerprint and wall time of each finished stage
"""

from __future__ import annotations

from pathlib import Path

EDITS = "edits.jsonl"
INFUSED = "infused"
INFUSED_CORPUS = "infused_corpus"


class EditFolder:
    """The outputs of one editor run: ``infused/`` (the edited documents with their records), ``edits.jsonl`` (the
    records with each document's J trace) and ``infused_corpus/`` (the whole corpus with the edits in place)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def infused(self) -> Path:
        return self.root / INFUSED

    @property
    def edits(self) -> Path:
        return self.root / EDITS

    @property
    def infused_corpus(self) -> Path:
        return self.root / INFUSED_CORPUS

    @property
    def fingerprint(self) -> Path:
        """A baseline's cache marker: the edit-stage fingerprint its edits were made under."""
        return self.root / "fingerprint.json"


class RunFolder(EditFolder):
    """A run's output_dir. The infused arm's edits sit at its top level; see the module docstring for the layout."""

    config = property(lambda self: self.root / "config.yaml")
    corpus = property(lambda self: self.root / "corpus.jsonl")
    heldout_corpus = property(lambda self: self.root / "heldout_corpus.json")
    ihvp = property(lambda self: self.root / "ihvp.safetensors")
    measure = property(lambda self: self.root / "measure.json")
    optimizer_stats = property(lambda self: self.root / "optimizer_stats.safetensors")
    scores = property(lambda self: self.root / "scores.safetensors")
    selection = property(lambda self: self.root / "selection.json")
    retrain = property(lambda self: self.root / "retrain")
    retrain_summary = property(lambda self: self.root / "retrain" / "summary.json")
    results = property(lambda self: self.root / "results.json")
    report_md = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    plots = property(lambda self: self.root / "plots")

    def stage_record(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def baseline(self, arm: str) -> EditFolder:
        return EditFolder(self.root / "baselines" / arm)

    def edits_of(self, arm: str) -> EditFolder:
        """Where an edited arm's outputs are: the top level for infused, baselines/<arm>/ otherwise."""
        return self if arm == "infused" else self.baseline(arm)

    def clean_checkpoint(self, fp: str) -> Path:
        return self.retrain / f"clean-{fp}"

    def shared_control(self, fp: str, seed: int) -> Path:
        return self.retrain / f"control-{fp}-seed{seed}"

    def arm(self, arm: str) -> Path:
        return self.retrain / arm

    def arm_seed(self, arm: str, seed: int) -> Path:
        return self.retrain / arm / f"seed-{seed}.json"

    def observations(self, arm: str) -> Path:
        return self.retrain / arm / "observations.json"
