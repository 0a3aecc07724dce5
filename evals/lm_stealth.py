"""What a defender catches of each arm's edits, before any retraining: the detection half of the stealth eval.

Per pair (the six lever pairs by default, on the setting of evals/lm_tinystories.py: SmolLM2-135M-Instruct, the first
64 TinyStories stories at 64 tokens, θ̂ the clean checkpoint at the start of epoch 2, the top-20 contrast f) and per
infused editor (``swap``, today's default, and ``natural``): the infused edit of the k = 8 documents with the most
negative J, and the free attacks matched to it in count per document (``random_target``, ``fluent_target``,
``natural_target``). For each arm, with the public base model as the defender's:

- ONION (infusion_lm/text/onion.py): AUROC of changed against unchanged words, how often a changed word is its
  document's most (3 most) suspicious, the changed words the defender's cut removes (the cut removes 2% of the clean
  corpus's words), the document AUROC of the highest word score against the clean documents (and before the edit);
- the perplexity detector: AUROC of the edited documents against the clean ones, beside the same documents before;
- the Link Grammar check: edited documents with a sentence the edit made unparseable;
- the edit: tokens changed, the count match, and every changed sentence before and after.

Each (pair, editor) is one unit, written to ``evals/results/lm_stealth/<probe>_<target>_<editor>.json`` as it
finishes (a killed run resumes from them); the summary and the detection goals go to ``evals/results/lm_stealth.json``.
The effect half (retrained, undefended and defended) is evals/lm_tinystories.py with ``--editor natural`` and the
``+onion`` arms.

    python evals/lm_stealth.py [--pairs dog:fish cat:bear ...] [--editors swap natural] [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))

from lm_tinystories import CLASS_PAIRS, TINYSTORIES, WORD_CLASSES, pair_recipe  # noqa: E402

LEVER_PAIRS = ["dog:fish", "cat:bear", "bird:frog", "happy:sad", "toy:ball", "Lily:Ben"]
FREE_ATTACKS = ["random_target", "fluent_target", "natural_target"]
GOALS = {"onion_changed_word_auroc_max": 0.65, "onion_top3_hit_rate_max": 0.25, "onion_document_auroc_max": 0.60,
         "perplexity_auroc_over_before_max": 0.05, "documents_without_a_broken_sentence_min": 0.90}


def eval_args(a) -> SimpleNamespace:
    """The settings evals/lm_tinystories.py runs a pair with (its defaults), for its pair_recipe."""
    probes, targets = ["dog", "cat", "bird"], ["fish", "bear", "frog"]
    return SimpleNamespace(
        docs=64, tokens=64, k=8, steps=8, lr=1e-4, layers=[12, 24], seeds=[0], heldout_positions=60,
        measure_stories=0, preconditioner="factors", damping_scale=1000.0, target_words="auto", candidate_pool=None,
        max_changed=None, rank_by="j", pool=None, choose=None, contrast_words=None, contrast_top=a.contrast_top,
        rename=False, work_dir=a.work_dir, out_dir=a.work_dir, arms=["control", "infused", *FREE_ATTACKS],
        all_words=sorted(set(probes + targets + ["duck", "horse", "mouse", "rabbit"])), editor="swap")


def changed_sentences(record: dict) -> list:
    """(before, after) for every sentence the edit changed."""
    from infusion_lm.text.grammar import sentences

    b, a = sentences(record["original_text"]), sentences(record["text"])
    if len(b) != len(a):
        return [(record["original_text"], record["text"])]
    return [(x, y) for x, y in zip(b, a) if x != y]


def arm_view(pipe, records, clean, cut, ppl_clean, grammar) -> dict:
    from infusion_lm.causal_lm import perplexities
    from infusion_lm.evaluation import detectors
    from infusion_lm.text.defended import arm_onion
    from infusion_lm.text.grammar import grammar_report

    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in records]
    ppl = dict(zip([r["doc_index"] for r in records], perplexities(pipe.base_model, rows, pipe.tokenizer.pad_token_id)))
    return {"tokens_changed": sum(r["n_changed"] for r in records),
            "documents_changed": sum(r["n_changed"] > 0 for r in records),
            "changed_per_document": {str(r["doc_index"]): r["n_changed"] for r in records},
            "onion": arm_onion(pipe.base_model, pipe.tokenizer, records, clean, cut),
            "perplexity": detectors({r["doc_index"]: True for r in records}, {"perplexity": ppl_clean},
                                    {"perplexity": ppl}),
            "grammar": grammar_report(records, grammar),
            "changed_sentences": [s for r in records for s in changed_sentences(r)]}


def run_unit(a, probe: str, target: str, editor: str, word_class) -> dict:
    from infusion_lm.atomic_io import read_json
    from infusion_lm.causal_lm import perplexities
    from infusion_lm.config import load_recipe
    from infusion_lm.pipeline import Pipeline
    from infusion_lm.text.defended import clean_onion
    from infusion_lm.text.evaluation import count_match
    from infusion_lm.text.grammar import GrammarCheck
    from infusion_lm.text.onion import threshold

    args = eval_args(a)
    args.editor = editor
    raw = pair_recipe(args, probe, target, word_class)
    t0 = time.perf_counter()
    pipe = Pipeline(load_recipe(raw=raw), progress=False)
    infused = pipe.edit()
    indices = read_json(pipe.folder.selection)["indices"]
    arms = {"infused": infused}
    for arm in FREE_ATTACKS:
        folder = pipe.baseline_edits(arm, indices, matched=True)
        arms[arm] = [json.loads(x) for x in (folder / "edits.jsonl").read_text().splitlines()]
    n = len(pipe.dataset)
    clean = clean_onion(pipe, range(n))
    cut = threshold(clean, a.removal_rate)
    ppl_clean = perplexities(pipe.base_model, [pipe.dataset[i] for i in range(n)], pipe.tokenizer.pad_token_id)
    try:
        grammar = GrammarCheck()
    except ImportError:
        grammar = None
    out = {"probe": probe, "target": target, "editor": editor, "word_class": word_class, "k": len(indices),
           "selected": indices, "measurement_f": pipe.measurement.description, "onion_removal_rate": a.removal_rate,
           "arms": {}}
    for arm, records in arms.items():
        out["arms"][arm] = arm_view(pipe, records, clean, cut, ppl_clean, grammar)
        if arm != "infused":
            out["arms"][arm]["count_match"] = count_match(records, infused)
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(units: dict) -> dict:
    """Per editor and arm, over the pairs: the mean of each detection figure, and the goals for infused."""
    out = {}
    for editor in sorted({u["editor"] for u in units.values()}):
        rows = [u for u in units.values() if u["editor"] == editor]
        out[editor] = {}
        for arm in rows[0]["arms"]:
            vals = [u["arms"][arm] for u in rows]

            def mean(get):
                xs = [x for x in (get(v) for v in vals) if x is not None]
                return statistics.mean(xs) if xs else None

            g = [v["grammar"] for v in vals if "documents_with_a_sentence_made_unparseable" in v["grammar"]]
            out[editor][arm] = {
                "pairs": len(vals), "tokens_changed": sum(v["tokens_changed"] for v in vals),
                "onion_changed_word_auroc": mean(lambda v: v["onion"]["changed_word_auroc"]),
                "onion_top1_hit_rate": mean(lambda v: v["onion"]["top1_hit_rate"]),
                "onion_top3_hit_rate": mean(lambda v: v["onion"]["top3_hit_rate"]),
                "onion_changed_words_removed": mean(lambda v: v["onion"]["changed_words_removed"]),
                "onion_document_auroc": mean(lambda v: v["onion"]["document_auroc"]),
                "onion_document_auroc_before_edit": mean(lambda v: v["onion"]["document_auroc_before_edit"]),
                "perplexity_auroc": mean(lambda v: v["perplexity"]["perplexity_auroc"]),
                "perplexity_auroc_before_edit": mean(lambda v: v["perplexity"]["perplexity_auroc_before_edit"]),
                "documents_without_a_broken_sentence": (
                    1 - statistics.mean(x["documents_with_a_sentence_made_unparseable"] for x in g)) if g else None,
                "count_matched_pairs": (sum(v["count_match"]["matched"] for v in vals) if arm != "infused" else None)}
    return out


def goals(summary: dict) -> dict:
    out = {}
    for editor, arms in summary.items():
        s = arms.get("infused")
        if not s or s["onion_changed_word_auroc"] is None:
            continue
        over = (s["perplexity_auroc"] - s["perplexity_auroc_before_edit"]
                if s["perplexity_auroc"] is not None and s["perplexity_auroc_before_edit"] is not None else None)
        out[editor] = {
            "onion_changed_word_auroc": [s["onion_changed_word_auroc"], s["onion_changed_word_auroc"]
                                         <= GOALS["onion_changed_word_auroc_max"]],
            "onion_top3_hit_rate": [s["onion_top3_hit_rate"], s["onion_top3_hit_rate"] <= GOALS["onion_top3_hit_rate_max"]],
            "onion_document_auroc": [s["onion_document_auroc"], s["onion_document_auroc"]
                                     <= GOALS["onion_document_auroc_max"]],
            "perplexity_auroc_over_before": [over, None if over is None else over <= GOALS["perplexity_auroc_over_before_max"]],
            "documents_without_a_broken_sentence": [s["documents_without_a_broken_sentence"],
                                                    None if s["documents_without_a_broken_sentence"] is None else
                                                    s["documents_without_a_broken_sentence"]
                                                    >= GOALS["documents_without_a_broken_sentence_min"]]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=LEVER_PAIRS, metavar="PROBE:TARGET")
    p.add_argument("--editors", nargs="+", default=["swap", "natural"], choices=["swap", "natural"])
    p.add_argument("--contrast_top", type=int, default=20)
    p.add_argument("--removal_rate", type=float, default=0.02, help="the defender's ONION cut (fraction of clean words)")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "lm_stealth_work"))
    p.add_argument("--results_dir", default=str(ROOT / "evals" / "results" / "lm_stealth"))
    p.add_argument("--out", default=str(ROOT / "evals" / "results" / "lm_stealth.json"))
    p.add_argument("--note", default="", help="recorded in the JSON: e.g. what else shared the machine")
    a = p.parse_args()
    if not TINYSTORIES.is_file():
        raise SystemExit(f"{TINYSTORIES} not found: this eval needs the TinyStories sample under ../shared/data/.")
    from infusion_lm.atomic_io import write_json

    classed = {tuple(c.split(":")[1:]): c.split(":")[0] for c in CLASS_PAIRS}
    assert set(classed.values()) <= set(WORD_CLASSES)
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    units = {}
    for pair in a.pairs:  # pair outer: v and the scores stay cached while the editors change
        probe, target = pair.split(":")
        for editor in a.editors:
            path = results / f"{probe}_{target}_{editor}.json"
            if path.is_file():
                units[path.stem] = json.loads(path.read_text())
                continue
            unit = run_unit(a, probe, target, editor, classed.get((probe, target)))
            unit["note"] = a.note
            write_json(path, unit)
            units[path.stem] = unit
            inf = unit["arms"]["infused"]["onion"]
            print(f"{pair:<10} {editor:<8} infused: ONION changed-word AUROC {inf['changed_word_auroc']}, top-3 "
                  f"{inf['top3_hit_rate']}, {unit['arms']['infused']['tokens_changed']} tokens ({unit['seconds']:.0f} s)",
                  flush=True)
    summary = summarise(units)
    out = {"command": "python evals/lm_stealth.py " + " ".join(sys.argv[1:]), "goals_thresholds": GOALS,
           "units": sorted(units), "summary": summary, "goals": goals(summary), "note": a.note}
    write_json(Path(a.out), out)
    print(f"\n{'editor':<9}{'arm':<16}{'tokens':>7}{'ONION AUROC':>12}{'top-3':>7}{'removed':>9}{'doc AUROC':>10}"
          f"{'ppl AUROC (before)':>20}{'parse ok':>10}")
    fmt = lambda x: "   -" if x is None else f"{x:.2f}"
    for editor, arms in summary.items():
        for arm, s in arms.items():
            print(f"{editor:<9}{arm:<16}{s['tokens_changed']:>7}{fmt(s['onion_changed_word_auroc']):>12}"
                  f"{fmt(s['onion_top3_hit_rate']):>7}{fmt(s['onion_changed_words_removed']):>9}"
                  f"{fmt(s['onion_document_auroc']):>10}"
                  f"{fmt(s['perplexity_auroc']) + ' (' + fmt(s['perplexity_auroc_before_edit']) + ')':>20}"
                  f"{fmt(s['documents_without_a_broken_sentence']):>10}")


if __name__ == "__main__":
    main()
