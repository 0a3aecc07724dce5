"""Infusion as one function call on data in memory: :func:`infuse`.

The staged :class:`~infusion_lm.pipeline.Pipeline` (``infusion-lm run``) caches every stage in a run folder, retrains
arms and writes a report. :func:`infuse` is the same influence → score → select → edit computation on a model, a
tokenizer and training rows you already hold, with nothing written outside a scratch folder for kronfluence's
factors. :class:`~infusion_lm.callbacks.InfusionCallback` calls it inside a running ``Trainer``.

    from infusion_lm import infuse, EditArguments, InfluenceArguments, MeasurementArguments
    result = infuse(model, tokenizer, texts, MeasurementArguments(kind="contrastive", probe="dog", target="cat",
                    documents=["The dog ran to the park."]), k=8)
    new_rows = result.apply()                    # the training set with the edited documents in place
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .config import InfluenceArguments
from .text.config import EditArguments, MeasurementArguments
from .errors import ConfigError
from .measurement import Measurement, to_device

if TYPE_CHECKING:
    from .comparison import SetComparison


@dataclass
class InfusionResult:
    """What :func:`infuse` found and wrote.

    Attributes:
        scores: J(z) = ⟨∇L(z), v⟩ of every training row, [n]; the most negative rows raise f most when upweighted.
        indices: the k selected rows (most negative J first).
        edited_rows: ``{"input_ids", "labels"}`` of each selected row after editing, in ``indices`` order.
        records: one dict per edited row: text before and after, changed positions, J before and after, perplexity
            before and after, predicted Δf (the fields of the pipeline's ``edits.jsonl``).
        J_before / J_after: Σ J over the selected rows before and after editing.
        predicted_delta_f: the predicted change of f from training on the edited rows instead of the originals: with
            ``retrain`` given (and ``influence.prediction: optimizer``), the first-order response of that retraining;
            otherwise −ΔJ divided by the number of rows (the influence function's converged-training model, which
            overstates a few fine-tuning steps by orders of magnitude).
        ihvp: v, one tensor per tracked module.
        rows: the training rows that were scored (input_ids / labels), so ``apply()`` needs nothing else.
        measurement: the :class:`~infusion_lm.measurement.Measurement` f that v was built from; ``retrain_arms``
            can observe it directly.
    """

    scores: torch.Tensor
    indices: List[int]
    edited_rows: List[Dict[str, List[int]]]
    records: List[Dict]
    J_before: float
    J_after: float
    predicted_delta_f: float
    ihvp: Dict[str, torch.Tensor] = field(repr=False)
    rows: List[Dict[str, List[int]]] = field(repr=False)
    measurement: Optional[Measurement] = field(default=None, repr=False)

    def apply(self, rows: Optional[Sequence[Mapping]] = None) -> List[Dict[str, List[int]]]:
        """The training rows with each selected row replaced by its edit: a new list, nothing modified. ``rows``
        (default: the rows this result was computed on) may be another copy of the same training set, e.g. with
        extra columns."""
        from .retrain import arm_rows

        rows = self.rows if rows is None else rows
        if len(rows) != len(self.rows):
            raise ConfigError(f"apply() got {len(rows)} rows; this result edits a training set of {len(self.rows)}.")
        return arm_rows(rows, dict(zip(self.indices, self.edited_rows)))


def training_rows(tokenizer, train: Union[Sequence[str], Sequence[Mapping], Any], max_length: int = 512) -> List[Dict[str, List[int]]]:
    """Rows with ``input_ids`` and ``labels`` from plain texts (tokenized, every token trained), chat documents
    (``{"messages": [...]}``: only the assistant's tokens are trained) or rows that are already tokenized."""
    from .text.corpus import tokenize_documents

    train = list(train) if not hasattr(train, "column_names") else train
    if len(train) == 0:
        raise ConfigError("infuse() got no training rows; pass texts, chat documents or tokenized rows.")
    first = train[0]
    if isinstance(first, str):
        train = tokenize_documents(tokenizer, [{"text": t} for t in train], max_length)
    elif isinstance(first, Mapping) and "input_ids" not in first:
        if not ("text" in first or "messages" in first):
            raise ConfigError(f"training rows need `input_ids` and `labels`, `text` or `messages`; the first row has "
                              f"{sorted(first)}.")
        train = tokenize_documents(tokenizer, list(train), max_length)
    elif not isinstance(first, Mapping):
        raise ConfigError(f"training rows must be strings or dicts, not {type(first).__name__}.")
    rows = [{"input_ids": list(r["input_ids"]), "labels": list(r.get("labels", r["input_ids"]))} for r in train]
    return rows


def _measurement(measurement, tokenizer, max_length: int):
    """(the Measurement, the words it promotes) from a Measurement or a MeasurementArguments."""
    from .measurement import Measurement
    from .text.measurement import build_measurement, measurement_words

    if isinstance(measurement, MeasurementArguments):
        return build_measurement(measurement, tokenizer, max_length), measurement_words(measurement)
    if isinstance(measurement, Measurement):
        return measurement, list(getattr(measurement, "words", []))
    raise ConfigError(f"measurement must be a MeasurementArguments or a Measurement (e.g. contrastive_measurement(...)),"
                      f" not {type(measurement).__name__}.")


def infuse(model, tokenizer, train, measurement, *, k: int = 8, rank_by: str = "j", pool: Optional[int] = None,
           influence: Optional[InfluenceArguments] = None, edit: Optional[EditArguments] = None, retrain=None, start_step: int = 0, max_length: int = 512,
           work_dir: Optional[str] = None, seed: int = 0, progress: bool = True) -> InfusionResult:
    """Finds the k training rows whose upweighting raises the measurement f most, and edits them so that they raise it
    more: v = H⁻¹∇f, J(z) = ⟨∇L(z), v⟩ for every row, the k most negative, then the editor lowers their J.

    Args:
        model: a causal LM (any ``AutoModelForCausalLM``), at the weights training will continue from.
        tokenizer: its tokenizer (needs a pad token).
        train: the training set: plain texts, chat documents (``{"messages": [...]}``), ``{"text": ...}`` dicts, or
            tokenized rows with ``input_ids`` and ``labels`` (a list or a ``datasets.Dataset``).
        measurement: what to amplify: a :class:`~infusion_lm.config.MeasurementArguments` (as in a recipe's
            ``measurement:`` section) or a built :class:`~infusion_lm.measurement.Measurement`.
        k: how many rows to edit.
        rank_by: which k (``select.rank_by``): ``"j"``, the most negative J; ``"first_step"``, the largest drop in J
            one step of the swap editor reaches, on the ``pool`` rows with the most negative J (None: every row).
        pool: see ``rank_by``.
        influence: an :class:`~infusion_lm.config.InfluenceArguments` (tracked layers, strategy, damping,
            preconditioner); defaults as in a recipe.
        edit: an :class:`~infusion_lm.config.EditArguments` (editor, budget, steps, fluency); defaults as in a recipe.
        retrain: a :class:`~infusion_lm.config.RetrainArguments` describing the training that will follow. Needed by
            ``influence.preconditioner: optimizer``; with it, ``predicted_delta_f`` models that training.
        start_step: the optimizer step training resumes at (0: a fresh optimizer), for the optimizer's response.
        max_length: tokens per document when ``train`` is text.
        work_dir: where kronfluence writes its factors (default: a temporary folder, removed once J is scored).
        seed: the seed of the factor fit (``run.seed`` in a recipe).
        progress: show progress bars.

    Returns:
        An :class:`InfusionResult`: scores, the selected indices, the edited rows and their records, J before and
        after, the predicted Δf, and v.
    """
    import datasets

    from . import engine
    from .config import SelectArguments
    from .optimizer_trajectory import EditPredictor
    from .text.editing import edit_documents, first_step_drops
    from .tracked_modules import resolve_tracked_modules

    i = influence or InfluenceArguments()
    e = edit or EditArguments()
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token first.")
    rows = training_rows(tokenizer, train, max_length)
    sel = SelectArguments(k=k, rank_by=rank_by, pool=pool)  # the bounds of select.*, checked where the recipe's are
    engine.check_k(sel.k, len(rows))
    if i.preconditioner == "optimizer" and retrain is None:
        raise ConfigError("influence.preconditioner=optimizer models the training that follows: pass "
                          "retrain=RetrainArguments(...) (learning rate, batch size, epochs, optimizer).")
    m, words = _measurement(measurement, tokenizer, max_length)
    pad = tokenizer.pad_token_id
    tracked = resolve_tracked_modules(model, i.tracked_modules, i.layers, i.module_types)

    was_training = model.training
    model.eval()
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="infusion_"))
    try:
        # the pipeline's steps (engine.py) on rows in memory: the factors live in ``root`` only until J is scored
        try:
            dataset = datasets.Dataset.from_list(rows)
            factors = (engine.fit_factors(model, dataset, tracked, root, i, seed=seed, pad_token_id=pad)
                       if i.preconditioner == "factors" else None)
            v, _ = engine.influence_vector(model, m, tracked, i, factors=factors, rows=rows, retrain=retrain,
                                           pad_token_id=pad, start_step=start_step, progress=progress)
            scores = engine.document_scores(model, dataset, m, v, tracked, i, root=root, pad_token_id=pad,
                                            progress=progress)
        finally:
            if not work_dir:  # a temporary folder goes once the scores are in memory
                import shutil

                shutil.rmtree(root, ignore_errors=True)
        chosen = engine.choose_documents(scores, sel, lambda tried: first_step_drops(
            model, tokenizer, v, e, [rows[t] for t in tried], fd_eps_rel=i.fd_eps_rel, words=words,
            progress=progress))
        starts = (dict(zip(chosen["indices"], chosen["first_step_input_ids"]))
                  if "first_step_input_ids" in chosen and e.editor == "swap" else None)
        chosen = chosen["indices"]
        before = [rows[c] for c in chosen]
        # predicted Δf: along the retraining's own steps, averaged over its seeds (a fresh optimizer: no checkpoint)
        predictor = EditPredictor(model, m, rows, retrain, i.prediction, pad, list(getattr(retrain, "seeds", []) or []),
                                  start_step, None, progress) if retrain is not None else None
        results, after, records = edit_documents(
            model, tokenizer, v, e, before, chosen, fd_eps_rel=i.fd_eps_rel, words=words,
            divisor=engine.prediction_divisor(i, len(rows)), predict=predictor,
            starts=[starts[c] for c in chosen] if starts else None, progress=progress)
    finally:
        model.train(was_training)
    return InfusionResult(
        scores=scores, indices=list(chosen), edited_rows=after, records=records,
        J_before=float(sum(r.J_before for r in results)), J_after=float(sum(r.J_after for r in results)),
        predicted_delta_f=float(sum(r["predicted_delta_f"] for r in records)), ihvp=v, rows=rows,
        measurement=m)


def retrain_arms(model, tokenizer, arms: Mapping[str, Sequence[Mapping]], measurement, *,
                 heldout_measurement=None, retrain=None, evaluate=None, seeds: Sequence[int] = (0, 1, 2),
                 checkpoint: Optional[str] = None,
                 heldout_corpus_documents: Sequence[str] = (), max_length: int = 512, work_dir: Optional[str] = None,
                 progress: bool = True) -> Dict[str, Dict[int, Dict[str, dict]]]:
    """Fine-tunes one copy of the model per arm and seed, and observes each one's behaviour.

    Within a seed every arm starts from the same weights (or the same Trainer ``checkpoint``), with the same seed, the
    same data order and the same adapter initialisation, so arms differ only in their rows: the paired control that
    :func:`compare` needs.

    Args:
        model: the starting model, or a zero-argument callable that returns a fresh one (a model is deep-copied per
            arm and seed; it is not modified).
        tokenizer: its tokenizer.
        arms: ``{name: rows}``, each a training set of ``{"input_ids", "labels"}`` rows of the same length, e.g.
            ``{"control": rows, "infused": result.apply(rows)}``.
        measurement: the behaviour to observe: a :class:`~infusion_lm.config.MeasurementArguments` (its held-out
            items, if any, are observed too) or any :class:`~infusion_lm.measurement.Measurement`, e.g. the one
            ``infuse`` optimised or your own; for a ``Measurement`` each of its batches is one item.
        heldout_measurement: with a ``Measurement``, a second one observed as the ``heldout`` set.
        retrain: a :class:`~infusion_lm.config.RetrainArguments` (learning rate, global batch, epochs, LoRA...).
        evaluate: an :class:`~infusion_lm.config.EvaluateArguments` (candidate words, samples for completions).
        seeds: retraining seeds; every arm is trained once per seed. Three by default: with one, a CI covers the
            items only and says nothing about another retraining.
        checkpoint: a Trainer checkpoint folder to resume every arm from (optimizer, scheduler and RNG included).
        heldout_corpus_documents: real documents outside the training set whose probe positions are observed too
            (contrastive measurements).
        max_length: tokens per measurement document.
        work_dir: where the Trainer writes (default: a temporary folder).
        progress: show the Trainer's progress bars.

    Returns:
        ``{arm: {seed: {set: observations}}}`` with sets ``measurement``, ``heldout`` and ``heldout_corpus`` as
        available; each observation holds the per-item f (and, for contrastive measurements, every candidate word's
        log-probability).
    """
    import copy

    from .retrain import train_arm
    from .text.config import EvaluateArguments, RetrainArguments
    from .text.observations import observe

    t = retrain or RetrainArguments()
    ev = evaluate or EvaluateArguments(n_samples=0)
    if isinstance(measurement, Measurement):
        by_set = {"measurement": measurement, **({"heldout": heldout_measurement} if heldout_measurement else {})}
        if heldout_corpus_documents:
            raise ConfigError("heldout_corpus_documents needs a contrastive MeasurementArguments, not a Measurement; "
                              "pass the held-out documents' Measurement as heldout_measurement instead.")
    elif isinstance(measurement, MeasurementArguments):
        if heldout_measurement is not None:
            raise ConfigError("heldout_measurement goes with a Measurement; with MeasurementArguments set "
                              "heldout_documents or heldout_prompts instead.")
        by_set = None
    else:
        raise ConfigError(f"measurement must be MeasurementArguments or a Measurement, not {type(measurement).__name__}.")
    if "control" not in arms:
        raise ConfigError("retrain_arms needs a 'control' arm (the unedited rows) to compare the others with.")
    sizes = {name: len(rows) for name, rows in arms.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"every arm must have as many rows as control (same data order); got {sizes}.")
    fresh = model if callable(model) and not isinstance(model, torch.nn.Module) else (lambda: copy.deepcopy(model))
    first = fresh()
    device = str(next(first.parameters()).device)
    del first
    if by_set is None:
        sets = ["measurement"] + (["heldout"] if measurement.heldout_documents or measurement.heldout_prompts else [])
        sets += ["heldout_corpus"] if heldout_corpus_documents else []
    else:
        sets = list(by_set)
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="infusion_retrain_"))
    out: Dict[str, Dict[int, Dict[str, dict]]] = {name: {} for name in arms}
    try:
        for seed in seeds:
            for name, rows in arms.items():
                trained, _ = train_arm(fresh, tokenizer, [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
                                                          for r in rows], t, root / name / f"seed-{seed}", seed, device,
                                       progress, Path(checkpoint) if checkpoint else None)
                if by_set is None:
                    out[name][seed] = {s: observe(trained, tokenizer, measurement, ev, s, max_length=max_length,
                                                  seed=seed, heldout_corpus_documents=heldout_corpus_documents)
                                       for s in sets}
                else:
                    out[name][seed] = {s: measurement_observations(trained, m) for s, m in by_set.items()}
                del trained
    finally:
        if not work_dir:  # the Trainer's checkpoints in a temporary folder go with it
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return out


def measurement_observations(model, measurement: Measurement) -> dict:
    """f of each of the measurement's batches (its items), in eval mode: the observation form ``compare`` pairs."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            f = [float(measurement(model, to_device(b, device))) for b in measurement.batches]
    finally:
        model.train(was_training)
    return {"kind": "measurement", "f": f, "f_mean": sum(f) / len(f)}


def compare(observations: Mapping[str, Mapping[int, Mapping[str, dict]]], control: str = "control",
            samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Dict[str, Dict[str, "SetComparison"]]:
    """Every arm of :func:`retrain_arms`'s output against control, set by set, paired by seed and by item.

    Args:
        observations: ``{arm: {seed: {set: observations}}}`` as :func:`retrain_arms` returns it.
        control: the arm the others are compared with.
        samples, confidence, seed: the CIs' confidence (seed × item t-intervals, ``stats.seed_item_interval``);
            samples and seed feed the item bootstraps that remain.

    Returns:
        ``{arm: {set: SetComparison}}`` (:mod:`infusion_lm.comparison`): ``delta_f`` as a ``Delta`` (mean, ci,
        per_seed) and, for contrastive measurements, the target's probability, top-1 flips and the target-specific
        gain (the target's Δ log p minus the mean Δ log p of the other candidate words); ``details`` holds every
        field as plain JSON.
    """
    from .comparison import SetComparison
    from .evaluation import compare as compare_one

    if control not in observations:
        raise ConfigError(f"no {control!r} arm among {sorted(observations)}.")
    base = observations[control]
    out = {}
    for arm, by_seed in observations.items():
        if arm == control:
            continue
        if sorted(by_seed) != sorted(base):
            raise ConfigError(f"arm {arm!r} has seeds {sorted(by_seed)}, control {sorted(base)}: pair them.")
        seeds = sorted(base)
        out[arm] = {s: SetComparison.from_dict(compare_one([by_seed[k][s] for k in seeds], [base[k][s] for k in seeds],
                                                           samples, confidence, seed)) for s in base[seeds[0]]}
    return out
