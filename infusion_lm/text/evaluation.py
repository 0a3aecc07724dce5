"""The text modality's evaluation stage: every arm's observations against control (the comparisons are in
infusion_lm/evaluation.py), the edits' size and perplexity, predicted against actual Δf, the defender's view
(perplexity and the defender's own influence), then results.json and the report."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..atomic_io import read_json, write_json
from ..config_sections import arm_parts
from ..evaluation import arm_difference, compare, detectors, per_seed, primary_set, verdict
from ..run_folder import RunFolder
from .defended import arm_onion, clean_onion, detector_sample
from .onion import threshold


def _edit_summary(records: List[Dict]) -> Dict:
    ratios = [r["perplexity_after"] / r["perplexity_before"] for r in records]
    return {"documents": len(records), "tokens_changed": sum(r["n_changed"] for r in records),
            "budget": sum(r["budget"] for r in records),
            "J_before": sum(r["J_before"] for r in records), "J_after": sum(r["J_after"] for r in records),
            "predicted_delta_f": sum(r["predicted_delta_f"] for r in records),
            **({"predicted_delta_f_same_v": sum(r["predicted_delta_f_same_v"] for r in records)}
               if all("predicted_delta_f_same_v" in r for r in records) else {}),
            "perplexity_ratio_median": statistics.median(ratios) if ratios else None,
            "perplexity_ratio_max": max(ratios) if ratios else None}


# the baselines that promise the infused edit's count per document
MATCHED_ARMS = ("random", "random_target", "fluent_target", "natural_target")


def count_match(records: List[Dict], infused: List[Dict], in_order: bool = False) -> Dict:
    """How far a matched baseline fell short of the infused edit's changed-token count, document by document (the
    perplexity limit can reject every option at the positions left). A comparison is count-matched only where
    ``matched`` is true; otherwise ``shortfall_total`` says by how many tokens the baseline is smaller. ``in_order``:
    the baseline edited other documents (``@random``), the j-th taking the j-th infused document's count."""
    if in_order:
        short = {int(r["doc_index"]): i["n_changed"] - r["n_changed"] for r, i in zip(records, infused)}
    else:
        want = {r["doc_index"]: r["n_changed"] for r in infused}
        short = {int(r["doc_index"]): want[r["doc_index"]] - r["n_changed"] for r in records if r["doc_index"] in want}
    return {"shortfall_per_document": {str(k): v for k, v in short.items() if v},
            "shortfall_total": int(sum(v for v in short.values() if v > 0)),
            "matched": all(v <= 0 for v in short.values())}


def _arm_records(run_dir: Path, arm: str) -> Optional[List[Dict]]:
    import json

    path = RunFolder(run_dir).edits_of(arm).edits
    if arm in ("control", "insertion") or not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


DETECTOR_ASSUMPTIONS = {
    "perplexity": "The defender has the public base model and flags the documents it finds least likely (highest "
                  "perplexity). Needs nothing from the attacker.",
    "defender_influence": "The defender states a behaviour it guards against (any of `evaluate.defender_words` where "
                          "the text names the probe, on the held-out documents), fits influence on the corpus it "
                          "received, and flags the documents that most push that behaviour up (most negative J "
                          "under its own v). It does not know the attacker's target or measurement documents. "
                          "Here its v uses the run's preconditioner (factors fitted on the clean corpus, or the "
                          "optimizer's statistics).",
    "onion": "ONION (Qi et al., 2021): the defender scores each word by how much the document's perplexity under "
             "the public base model drops without it, and removes the words above a cut that removes "
             "`evaluate.onion_removal_rate` of the clean corpus's words. Needs nothing from the attacker.",
    "grammar": "The Link Grammar parser (no language model): a sentence that parsed with no null links before the "
               "edit and needs some after it. Needs nothing from the attacker, not even the base model.",
}


class DefenderView:
    """What a defender can compute without the attacker's v: perplexity under the base model, and influence under a
    measurement the defender states itself. Clean-corpus scores are computed once and shared by every arm."""

    def __init__(self, pipe, edited: Sequence[int] = ()):
        from ..forward_mode_j import document_j
        from ..influence import compute_ihvp
        from ..causal_lm import perplexities
        from .measurement import any_word_measurement

        self.pipe = pipe
        m, ev = pipe.recipe.measurement, pipe.recipe.evaluate
        self.pad = pipe.tokenizer.pad_token_id
        self.base = pipe.base_model
        rows = [pipe.dataset[i] for i in range(len(pipe.dataset))]
        self.clean = {"perplexity": perplexities(self.base, rows, self.pad)}
        self.J = None
        if m.kind == "contrastive":
            words = list(ev.defender_words) or [w for w in [m.target, *ev.candidates] if w.strip() != m.probe.strip()]
            docs = m.heldout_documents or m.documents
            measurement = any_word_measurement(pipe.tokenizer, docs, m.probe, words)
            if pipe.uses_factors:
                v = compute_ihvp(pipe.model, measurement, pipe.tracked, pipe.factors_dir, pipe.damping)
            else:
                from ..optimizer_influence import optimizer_ihvp

                v, _ = optimizer_ihvp(pipe.model, measurement, pipe.tracked, pipe.arm_rows({}), pipe.recipe.retrain,
                                      self.pad, pipe.checkpoint_step(), stats=pipe.optimizer_stats())
            i = pipe.recipe.influence
            self.J = document_j(pipe.model, v, i.j_method, i.fd_eps_rel)
            self.words = words
            self.clean["defender_influence"] = (-self.J.dataset(rows, self.pad)).tolist()
        self.onion_clean = clean_onion(pipe, detector_sample(pipe, edited)) if "onion" in ev.defences else None
        self.onion_cut = threshold(self.onion_clean, ev.onion_removal_rate) if self.onion_clean else None
        self.grammar = None
        if "grammar" in ev.defences:
            from .grammar import GrammarCheck

            try:
                self.grammar = GrammarCheck()
            except ImportError as e:
                print(f"evaluate.defences: grammar skipped ({e})", flush=True)

    def scores(self, records: List[Dict]) -> Dict:
        from ..causal_lm import perplexities

        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records]
        idx = [r["doc_index"] for r in records]
        scores = {"perplexity": dict(zip(idx, perplexities(self.base, rows, self.pad)))}
        if self.J is not None:
            scores["defender_influence"] = dict(zip(idx, (-self.J.dataset(rows, self.pad)).tolist()))
        out = detectors({i: True for i in idx}, self.clean, scores)
        if self.J is not None:
            out["defender_words"] = self.words
        return out

    def defences(self, records: List[Dict], arm: str) -> Dict:
        """The word-level defences on one arm's edited documents (ONION scores only the documents the arm changed)."""
        from .grammar import grammar_report

        out = {}
        if self.onion_clean is not None:
            out["onion"] = arm_onion(self.base, self.pipe.tokenizer, records, self.onion_clean, self.onion_cut, arm)
        if "grammar" in self.pipe.recipe.evaluate.defences:
            out["grammar"] = grammar_report(records, self.grammar)
        return out


def defended_effect(results: Dict) -> Dict:
    """Per arm retrained both as received and defended (``<arm>+<defence>``): its target-specific gain on the primary
    set each way (each against its own control), and the fraction the defence left (``retained``)."""
    name, out = results["primary_set"], {}
    for arm, entry in results["arms"].items():
        base, _, defence = arm.partition("+")  # the same arm as received: its name without the defence
        if not defence or base not in results["arms"]:
            continue
        gain = {k: results["arms"][a][name]["specificity"]["target_specific_gain"] for k, a in
                (("undefended", base), ("defended", arm)) if "specificity" in results["arms"][a][name]}
        if len(gain) < 2:
            continue
        u, d = gain["undefended"]["mean"], gain["defended"]["mean"]
        out[arm] = {"set": name, "target_specific_gain_undefended": u, "target_specific_gain_defended": d,
                    "ci_defended": gain["defended"].get("ci"), "retained": d / u if u > 0 else None}
    return out


def evaluate_run(pipe) -> Dict:
    """Reads every arm's observations, compares them with control, writes results.json and the report."""
    from ..report import write_report

    run_dir, ev, seed = pipe.dir, pipe.recipe.evaluate, pipe.recipe.run.seed
    arms = pipe.recipe.retrain.arms
    sets = pipe.observed_sets()
    obs = {a: read_json(pipe.folder.observations(a)) for a in arms}
    control = obs["control"]
    summary = read_json(pipe.folder.retrain_summary)
    results: Dict = {"measurement": pipe.measurement.description, "theta_hat": summary.get("theta_hat"),
                     "theta_hat_target_rate": summary.get("theta_hat_target_rate"),
                     "control": {s: control["summary"][s] if "summary" in control else control[s]["f_mean"]
                                 for s in sets},
                     "seeds": control.get("seeds", [seed]), "sets": sets, "primary_set": primary_set(sets),
                     "n_documents": len(pipe.dataset), "k": pipe.recipe.select.k, "arms": {},
                     "detector_assumptions": DETECTOR_ASSUMPTIONS}
    edited = sorted({int(r["doc_index"]) for a in arms for r in _arm_records(run_dir, a) or []})
    defender = DefenderView(pipe, edited) if ev.detectors and edited else None
    infused_records = _arm_records(run_dir, "infused")
    for arm in arms:
        base, draw, defence = arm_parts(arm)
        if base == "control":
            continue
        # a defended arm against control trained on the same defence's filtered clean corpus
        ctrl = obs[f"control+{defence}"] if defence else control
        entry = {s: compare(per_seed(obs[arm], s), per_seed(ctrl, s), ev.bootstrap_samples, ev.confidence, seed)
                 for s in sets}
        entry["weights_equal_control"] = obs[arm]["weights"] == ctrl["weights"]
        if defence:
            entry["against"] = f"control+{defence}"
            entry["defence"] = obs[arm].get("defence")
        records = _arm_records(run_dir, arm)
        if records:
            entry["edits"] = _edit_summary(records)
            if base in MATCHED_ARMS and infused_records:
                entry["edits"]["count_match"] = count_match(records, infused_records, in_order=bool(draw))
            # one f on both sides: the measurement set is observed with the f v and the prediction were built from
            entry["predicted_vs_actual"] = {"predicted_delta_f": entry["edits"]["predicted_delta_f"],
                                            "actual_delta_f": entry["measurement"]["delta_f"]["mean"],
                                            "f": pipe.measurement.description}
            if defender is not None:
                entry["detectors"] = defender.scores(records)
                if ev.defences:
                    entry["defences"] = defender.defences(records, arm)
        results["arms"][arm] = entry
    if "infused" in arms and "random" in arms:
        name = results["primary_set"]
        results["verdict"] = {"set": name, "infused_minus_random": arm_difference(
            obs["infused"], obs["random"], control, name, ev.bootstrap_samples, ev.confidence, seed)}
    if defended := defended_effect(results):
        results["defended"] = defended
    results["verdict_sentence"] = verdict(results)
    write_json(pipe.folder.results, results)
    write_report(run_dir, results, pipe.tokenizer)
    return results
