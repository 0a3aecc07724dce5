"""The stage table: what each stage of a run needs, which recipe settings it depends on and which files it writes.

    synthesize (corpus: synthetic) ─► fit ─► measure ─► score ─► select ─► edit ─► retrain ─► evaluate

One table drives the order of the stages, their cache fingerprints (derived from the declared settings, the
fingerprints of the stages they need, and the inputs the recipe alone does not pin down, such as the model's weights),
which outputs make a stage current, the ``--dry-run`` listing and the CLI's commands. Three cache keys that are not
stages of their own sit beside them: the corpus, the clean checkpoint θ̂ and the shared control.

A setting is ``"section.field"`` or a whole ``"section"``; the top-level keys (``model``, ``corpus``, ...) are the
``run`` section. ``tests/test_fingerprints.py`` runs every stage and fails if one reads a setting it does not declare.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional, Tuple, Union

Keys = Union[Tuple[str, ...], Callable[["object"], Tuple[str, ...]]]  # static, or a function of the pipeline


@dataclass(frozen=True)
class Stage:
    """One row of the table. ``needs``, ``settings``, ``inputs`` and ``outputs`` are tuples, or functions of the
    pipeline where they depend on the recipe (e.g. the measure stage needs the factors only with
    ``influence.preconditioner: factors``)."""

    name: str
    help: str
    needs: Keys = ()  # stages (or cache keys) whose fingerprints enter this one's
    settings: Keys = ()  # recipe settings it depends on
    inputs: Keys = ()  # pipeline-computed inputs (content hashes, resolved module names): see INPUT_SETTINGS
    outputs: Callable[["object"], List] = lambda p: []  # the files that make it current, given the pipeline
    command: Optional[str] = None  # the CLI command that runs up to this stage
    step: bool = True  # False: a cache key, not a stage that runs
    runs_when: Callable[["object"], bool] = lambda p: True  # False: skipped for this recipe (no cost, no record)

    def resolve(self, attr: str, pipe) -> Tuple[str, ...]:
        value = getattr(self, attr)
        return tuple(value(pipe) if callable(value) else value)


# Settings behind each pipeline-computed input (what the test of declared reads counts as read through it).
INPUT_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "weights": ("run.model", "run.dtype", "run.seed"),  # the recipe model's weights (seed: an image model's init)
    "user_checkpoint": ("retrain.checkpoint",),  # the bytes of the user's own clean checkpoint
    "corpus_content": ("run.corpus",),  # the bytes of the corpus file or folder
    "tracked": ("influence.tracked_modules", "influence.layers", "influence.module_types"),  # resolved module names
}

# retrain.* settings that shape the optimizer's v (influence.preconditioner: optimizer models the retraining itself)
RETRAINING = tuple(f"retrain.{k}" for k in ("learning_rate", "optim", "lr_scheduler_type", "batch_size", "epochs",
                                            "from_scratch", "max_grad_norm"))


def section_fields(recipe, section: str, **flags) -> Tuple[str, ...]:
    """Every field of a recipe section, as the recipe's modality declares it (none: a section it does not have).
    ``flags``: only the fields whose metadata has these values (unset: the flag's default in FIELD_FLAGS), e.g.
    ``clean_run=False`` for the retrain settings that do not change θ̂'s clean run (see infusion_lm/config.py)."""
    from .config import FIELD_FLAGS

    obj = getattr(recipe, section)
    if obj is None:
        return ()
    return tuple(f.name for f in fields(obj) if f.init
                 and all(f.metadata.get(k, FIELD_FLAGS[k]) == v for k, v in flags.items()))


def _keys(p, section: str, **flags) -> Tuple[str, ...]:
    return tuple(f"{section}.{k}" for k in section_fields(p.recipe, section, **flags))


def _select_settings(p) -> Tuple[str, ...]:
    # ranked by J, the selection depends on k alone (pool only bounds the documents first_step tries)
    if p.recipe.select.rank_by == "j":
        return ("select.k", "select.rank_by")
    return ("select", "edit", "influence.fd_eps_rel")


def _at_checkpoint(p) -> Tuple[str, ...]:
    return ("checkpoint",) if p.at_checkpoint else ()


def _measure_settings(p) -> Tuple[str, ...]:
    # the held-out sets only pick what retraining observes: they do not enter v
    keys = _keys(p, "measurement", evaluation_only=False) + ("influence.preconditioner", "retrain.influence_at")
    return keys + (("influence.damping", "influence.damping_scale") if p.uses_factors else RETRAINING)


def _score_settings(p) -> Tuple[str, ...]:
    i = p.recipe.influence
    if p.uses_factors and i.damping_scale == 1.0:  # kronfluence's own scores: everything is upstream
        return ()
    # the finite difference's step only matters to (and is only fingerprinted for) the finite difference
    return ("influence.j_method",) + (("influence.fd_eps_rel",) if i.j_method == "finite_difference" else ())


TABLE: Tuple[Stage, ...] = (
    # cache keys
    Stage("corpus", "the training documents", step=False,
          needs=lambda p: ("synthesize",) if p.synthetic else (),
          settings=lambda p: p.modality.corpus_settings,
          inputs=lambda p: () if p.synthetic else ("corpus_content",)),
    Stage("checkpoint", "θ̂: the clean fine-tune's checkpoint at the start of its last epoch", step=False,
          needs=("corpus",), settings=lambda p: _keys(p, "retrain", clean_run=True),
          inputs=("weights", "user_checkpoint")),
    Stage("control", "the control arm, shared between recipes on one checkpoint (retrain.share_control)", step=False,
          needs=("checkpoint",), settings=lambda p: _keys(p, "retrain", arms_model=True)),
    # stages, in order
    Stage("synthesize", "write the synthetic story corpus (corpus: synthetic) into output_dir/corpus.jsonl",
          settings=("run.model", "run.seed", "run.dtype", "synthesize"),
          outputs=lambda p: [p.folder.corpus], command="synthesize", runs_when=lambda p: p.synthetic),
    Stage("fit", "fit EK-FAC (or K-FAC, diagonal) factors with kronfluence",
          needs=lambda p: ("corpus",) + _at_checkpoint(p),
          settings=("retrain.influence_at", "influence.strategy", "influence.use_empirical_fisher",
                    "influence.covariance_max_examples"),
          inputs=("tracked", "weights"),
          outputs=lambda p: [p.factors_dir / "infusion_fingerprint.json"], command="fit"),
    Stage("measure", "compute v = (G+λI)^-1 ∇f for the whole measurement",
          needs=lambda p: ("fit",) if p.uses_factors else ("corpus",) + _at_checkpoint(p),
          settings=_measure_settings, inputs=lambda p: () if p.uses_factors else ("tracked", "weights"),
          outputs=lambda p: [p.folder.ihvp, p.folder.measure] + ([] if p.uses_factors else [p.folder.optimizer_stats]),
          command="measure"),
    Stage("score", "score every training document, J(z) = <∇L(z), v>",
          needs=("measure",), settings=_score_settings, outputs=lambda p: [p.folder.scores]),
    Stage("select", "select the k documents with the most negative J",
          needs=("score",), settings=_select_settings, outputs=lambda p: [p.folder.selection], command="score"),
    Stage("edit", "edit the selected documents to lower J and write the infused corpus",
          needs=lambda p: ("select",) + (("checkpoint",) if p.recipe.influence.prediction == "optimizer" else ()),
          settings=("edit", "influence.fd_eps_rel", "influence.prediction"),
          outputs=lambda p: [p.folder.infused, p.folder.edits, p.folder.infused_corpus], command="edit"),
    Stage("retrain", "retrain every arm (control, infused, baselines) from the clean checkpoint with the HF Trainer",
          needs=("edit",), settings=lambda p: ("retrain", "measurement") + _keys(p, "evaluate", observed=True),
          outputs=lambda p: [p.folder.retrain_summary], command="retrain"),
    Stage("evaluate", "compare every arm with control and write results.json, report.md and report.html",
          needs=("retrain",), settings=("evaluate",),
          outputs=lambda p: [p.folder.results, p.folder.report_md, p.folder.report_html], command="evaluate"),
)

BY_NAME: Dict[str, Stage] = {s.name: s for s in TABLE}
STAGES: List[str] = [s.name for s in TABLE if s.step]
# CLI command -> the stage it runs up to ("score" also selects: its output is the selection)
COMMANDS: Dict[str, str] = {s.command: s.name for s in TABLE if s.command}


def reaches(upto: str, stage: str) -> bool:
    """Whether running up to ``upto`` includes ``stage``."""
    return STAGES.index(upto) >= STAGES.index(stage)


def setting_value(recipe, key: str):
    """The value of ``"section.field"`` (or of a whole section, as a dict) in a recipe."""
    from dataclasses import asdict

    section, _, name = key.partition(".")
    obj = getattr(recipe, section)
    if obj is None:  # a section the recipe's modality does not have
        return None
    return getattr(obj, name) if name else asdict(obj)


def fingerprint_key(pipe, name: str) -> dict:
    """What a stage's fingerprint hashes: its needs' fingerprints, its settings' values and its inputs."""
    st = BY_NAME[name]
    return {"stage": name,
            "needs": {n: pipe.stage_fingerprint(n) for n in st.resolve("needs", pipe)},
            "settings": {k: setting_value(pipe.recipe, k) for k in st.resolve("settings", pipe)},
            "inputs": {k: pipe.stage_input(k) for k in st.resolve("inputs", pipe)}}


def declared_settings(pipe, name: str) -> set:
    """Every recipe setting ("section.field") a stage's fingerprint covers, through its needs and inputs too."""
    out, todo, seen = set(), [name], set()
    while todo:
        st = BY_NAME[todo.pop()]
        if st.name in seen:
            continue
        seen.add(st.name)
        for key in st.resolve("settings", pipe):
            section, _, field = key.partition(".")
            out.update([key] if field else (f"{section}.{f}" for f in section_fields(pipe.recipe, section)))
        for inp in st.resolve("inputs", pipe):
            out.update(INPUT_SETTINGS[inp])
        todo.extend(st.resolve("needs", pipe))
    return out
