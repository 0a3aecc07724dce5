"""The text modality: a causal LM and its tokenizer, documents (plain text or chats) as token rows, contrastive,
completion and callable measurements, the token editors, and per-item observations of the model's next words."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .corpus import load_documents, tokenize_documents
from .evaluation import MATCHED_ARMS
from ..distributed import is_main
from ..errors import ConfigError, MeasurementError
from .measurement import build_measurement, measurement_words
from .models import load_model
from ..config_sections import arm_parts
from ..devices import resolve_device
from ..run_context import RunContext
from ..tracked_modules import resolve_tracked_modules
from .config import (HELDOUT_SEED_OFFSET, SYNTHETIC, EditArguments, EvaluateArguments, MeasurementArguments,
                     RetrainArguments, RunArguments, SynthesizeArguments)

logger = logging.getLogger(__name__)


def random_documents(n: int, selected: List[int], seed: int) -> List[int]:
    """As many documents as ``selected``, drawn (seeded) from the rest of the corpus: a free attack on them measures
    what choosing the documents by J adds, apart from what the edit adds."""
    import random

    chosen = set(selected)
    rest = [i for i in range(n) if i not in chosen]
    return random.Random(seed).sample(rest, min(len(selected), len(rest)))


class TextModality:
    """Text documents and a causal LM (see :class:`~infusion_lm.modality.Modality` for what each method owes)."""

    name = "text"
    # the tokenized documents depend on these (and on the corpus file's bytes, or the synthesize stage)
    corpus_settings = ("run.modality", "run.model", "run.dtype", "run.seed", "run.corpus", "run.text_field",
                       "run.messages_field", "run.separator", "run.max_length", "run.add_eos", "run.max_documents")

    measurement_kinds = ("contrastive", "completion", "callable")
    editors = ("swap", "natural", "simplex_pgd", "random")
    arms = ("control", "infused", "random", "random_unmatched", "random_target", "fluent_target", "natural_target",
            "insertion", "simplex_pgd", "regeneration")
    select_rankings = ("j", "first_step")
    defences = ("onion",)  # `<arm>+onion`: the arm retrained on what ONION leaves of its corpus
    defence_settings = ("evaluate.onion_removal_rate",)  # what only the `+onion` arms' retraining depends on
    document_draws = ("random",)  # `<free attack>@random`: on k documents drawn at random instead of the selected k

    def __init__(self, ctx: RunContext):
        self.ctx = ctx  # what it may read of the run (infusion_lm/run_context.py); never the pipeline itself
        self.recipe = ctx.recipe

    # the class each recipe section is read into (infusion_lm/text/config.py)
    sections = {"run": RunArguments, "measurement": MeasurementArguments, "synthesize": SynthesizeArguments,
                "edit": EditArguments, "retrain": RetrainArguments, "evaluate": EvaluateArguments}

    @staticmethod
    def check_recipe(recipe) -> None:
        """Beyond its kinds, editors and arms (which the registry checks) and its sections' own bounds: only the
        matched baselines are drawn on other documents (``<arm>@random``)."""
        if wrong := [a for a in recipe.retrain.arms if arm_parts(a)[1] and arm_parts(a)[0] not in MATCHED_ARMS]:
            raise ConfigError(f"retrain.arms {wrong[0]!r}: only the matched baselines ({', '.join(MATCHED_ARMS)}) "
                              f"take '@random' (the same attack on k documents drawn at random).")

    # ---------------------------------------------------------------- models and data

    def load_model(self):
        r = self.recipe.run
        torch.manual_seed(r.seed)
        return load_model(r.model, dtype=r.dtype, device=resolve_device(r.device), trust_remote_code=r.trust_remote_code)

    def fresh_model(self):
        r = self.recipe.run
        device = str(next(self.ctx.base_model.parameters()).device)
        return load_model(r.model, dtype=r.dtype, device=device, trust_remote_code=r.trust_remote_code)[0]

    def arm_model(self):
        return self.fresh_model()

    def arm_checkpoint(self):
        return self.ctx.clean_checkpoint()

    def synthetic(self) -> bool:
        return self.recipe.run.corpus == SYNTHETIC

    def synthesize(self) -> None:
        from .synthesize import synthesize_chats, synthesize_stories, write_jsonl

        p, s = self.ctx, self.recipe.synthesize
        if s.mode == "chat":
            docs = synthesize_chats(p.base_model, p.tokenizer, s.n_docs, s.max_new_tokens, s.temperature, s.top_p,
                                    s.batch_size, self.recipe.run.seed, p.progress)
        else:
            docs = synthesize_stories(p.base_model, p.tokenizer, s.n_docs, s.max_new_tokens, s.temperature, s.top_p,
                                      s.batch_size, s.characters, self.recipe.run.seed, p.progress)
        write_jsonl(p.folder.corpus, docs)

    def documents(self):
        r = self.recipe.run
        if self.synthetic():
            self.ctx.synthesize()
            return load_documents(str(self.ctx.folder.corpus), "text")
        docs = load_documents(r.corpus, r.text_field, r.messages_field, r.separator)
        return docs[: r.max_documents] if r.max_documents else docs

    def dataset(self):
        r = self.recipe.run
        return tokenize_documents(self.ctx.tokenizer, self.ctx.documents, r.max_length, r.add_eos,
                                  r.long_documents)

    def corpus_size(self) -> int:
        return self.recipe.synthesize.n_docs if self.synthetic() else len(self.ctx.documents)

    def arm_rows(self, replacements: Dict[int, dict]) -> List[dict]:
        from ..retrain import arm_rows

        return arm_rows(self.ctx.dataset, replacements)

    def defended_rows(self, rows: List[dict], defence: str, arm: str):
        """The rows a defender keeps of an arm's corpus (``defence``: onion), and what it removed."""
        from .defended import defended_corpus

        return defended_corpus(self.ctx, rows, arm)

    def trainer_collator(self):
        return self.ctx.tokenizer  # the retraining builds the causal-LM collator from it

    # ---------------------------------------------------------------- influence

    def tracked(self) -> List[str]:
        p, i = self.ctx, self.recipe.influence
        model = p.base_model
        if p.lora_influence:  # θ̂ is a peft model: names from the same adapter layout, without training θ̂ first
            from ..retrain import trainable

            model = trainable(self.fresh_model(), self.recipe.retrain)
        return resolve_tracked_modules(model, i.tracked_modules, i.layers, i.module_types)

    def measurement(self):
        return build_measurement(self.recipe.measurement, self.ctx.tokenizer, self.recipe.run.max_length)

    def influence_kwargs(self, measurement=None) -> dict:
        return {"pad_token_id": self.ctx.tokenizer.pad_token_id}

    # ---------------------------------------------------------------- edits and arms

    def edit_into(self, out_dir: Path, args, indices: List[int], targets: Optional[List[int]] = None) -> None:
        from .edit_outputs import write_edit_outputs
        from .editing import edit_documents

        p = self.ctx
        _, _, records = edit_documents(p.model, p.tokenizer, p.load_ihvp(), args, [p.dataset[i] for i in indices],
                                       indices, fd_eps_rel=self.recipe.influence.fd_eps_rel,
                                       words=measurement_words(self.recipe.measurement),
                                       divisor=p.prediction_divisor, predict=self._predictor, targets=targets,
                                       starts=self._first_steps(args, indices), progress=p.progress)
        write_edit_outputs(out_dir, p.tokenizer, p.dataset, records, p.documents)

    def _first_steps(self, args, indices: List[int]) -> Optional[List[Optional[list]]]:
        """The swap editor continues from the selection's first step (select.rank_by: first_step), where there is one."""
        from ..atomic_io import read_json

        path = self.ctx.folder.selection
        if args.editor != "swap" or not path.is_file():
            return None
        sel = read_json(path)
        if "first_step_input_ids" not in sel:
            return None
        by_doc = dict(zip(sel["indices"], sel["first_step_input_ids"]))
        return [by_doc.get(i) for i in indices]

    def first_step(self, indices: List[int]) -> List[tuple]:
        from .editing import first_step_drops

        p = self.ctx
        return first_step_drops(p.model, p.tokenizer, p.load_ihvp(), self.recipe.edit, [p.dataset[i] for i in indices],
                                fd_eps_rel=self.recipe.influence.fd_eps_rel,
                                words=measurement_words(self.recipe.measurement), progress=p.progress)

    @cached_property
    def _predictor(self):
        """Predicted Δf of each edit (optimizer_trajectory.EditPredictor), built once per pipeline: the retraining's
        response in run.seed's data order (the retraining seed when retrain.seeds is empty, and otherwise one draw of
        the order like any seed's, so adding seeds does not redo the edits), from the checkpoint's optimizer state."""
        from ..optimizer_trajectory import EditPredictor

        p = self.ctx
        t = self.recipe.retrain
        if self.recipe.influence.prediction != "optimizer":
            return None
        return EditPredictor(p.model, p.measurement, self.arm_rows({}), t, self.recipe.influence.prediction,
                             p.tokenizer.pad_token_id, [self.recipe.run.seed], p.checkpoint_step(),
                             p.clean_checkpoint(), p.progress)

    def editor_revision(self, editor: str) -> int:
        from .editors import EDITORS

        return getattr(EDITORS.get(editor), "revision", 0)

    def replacements(self, arm: str, indices: List[int]) -> Dict[int, dict]:
        from .edit_outputs import load_infused
        from .insertion import insertion_rows, insertion_texts

        p = self.ctx
        if arm == "control":
            return {}
        if arm == "infused":
            return {r["doc_index"]: r for r in load_infused(p.dir)}
        if arm == "insertion":
            r = self.recipe.run
            return insertion_rows(p.tokenizer, insertion_texts(self.recipe, self.recipe.retrain), indices,
                                  r.max_length, r.add_eos)
        if arm == "regeneration":
            return self._regenerated(indices)
        base, _, docs = arm.partition("@")
        if docs == "random":  # a free attack on k documents drawn at random, the infused counts taken in order
            drawn = random_documents(len(p.dataset), indices, self.recipe.run.seed)
            edits = p.baseline_edits(arm, drawn, editor=base, matched=True, counts_from=indices)
        elif arm in MATCHED_ARMS:  # matched to the infused edit: as many changes per document
            edits = p.baseline_edits(arm, indices, matched=True)
        elif arm == "random_unmatched":  # the whole budget, no perplexity limit
            edits = p.baseline_edits(arm, indices, editor="random", max_perplexity_ratio=None)
        else:
            edits = p.baseline_edits(arm, indices)
        return {r["doc_index"]: r for r in load_infused(edits)}

    def _regenerated(self, indices: List[int]) -> Dict[int, dict]:
        """The regeneration arm: the selected conversations re-answered by the model at θ̂ (seeded, so every seed and
        a resumed run get the same rows); written to baselines/regeneration/documents.jsonl for inspection."""
        from .corpus import tokenize_document
        from .synthesize import regenerate_answers, write_jsonl

        p = self.ctx
        docs = [p.documents[i] for i in indices]
        if not all(isinstance(d, dict) and d.get("messages") for d in docs):
            raise ConfigError("retrain.arms has 'regeneration', which re-answers chat conversations; the corpus has "
                              "plain-text documents. Remove the arm or use a chat corpus (messages_field).")
        if "_regeneration" not in self.__dict__:
            r, s = self.recipe.run, self.recipe.synthesize
            new = regenerate_answers(p.model, p.tokenizer, [d["messages"] for d in docs], s.max_new_tokens,
                                     s.temperature, s.top_p, seed=r.seed)
            rows = {}
            for i, doc in zip(indices, new):
                if doc is None:  # an empty answer would leave nothing to train on: the original stays
                    continue
                row = tokenize_document(p.tokenizer, doc, r.max_length, r.add_eos)
                row.pop("truncated")
                rows[i] = {"doc_index": i, **row}
            if is_main():
                out = p.folder.baseline("regeneration").root / "documents.jsonl"
                out.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(out, [{"doc_index": i, **doc} for i, doc in zip(indices, new) if doc is not None])
            self.__dict__["_regeneration"] = rows
        return self.__dict__["_regeneration"]

    # ---------------------------------------------------------------- observation and evaluation

    @staticmethod
    def dry_run_costs(pipe) -> Dict:
        """The dry run's cost estimate: a function of the pipeline, like the core's stages."""
        from .dry_run import text_costs

        return text_costs(pipe)

    def theta_hat_summary(self, theta: Dict[str, dict]) -> Dict:
        """The share of θ̂'s answers that name the target, per evaluation set (completion measurements); a warning
        when it is 0 everywhere, since Infusion amplifies a behaviour the model already shows."""
        from .observations import target_rates

        rates = {name: r for name, r in ((n, target_rates(o)) for n, o in theta.items()) if r}
        if rates and not any(v for r in rates.values() for v in r.values()):
            logger.warning("No answer at θ̂ names %r (greedy or sampled): the rate starts at 0. Infusion amplifies a "
                           "behaviour the model already shows, so expect little change; pick a target the model "
                           "sometimes names.", self.recipe.measurement.completions[0])
        return {"theta_hat_target_rate": rates} if rates else {}

    def observed_sets(self) -> List[str]:
        return ["measurement", "heldout"] + (["heldout_corpus"] if self.recipe.measurement.heldout_corpus else [])

    @cached_property
    def heldout_corpus_documents(self) -> List[str]:
        """measurement.heldout_corpus's documents, less any that are also training or measurement documents."""
        m = self.recipe.measurement
        if not m.heldout_corpus:
            return []
        train = {str(d.get("text", "")).strip() for d in self.ctx.documents if isinstance(d, dict)}
        train |= {t.strip() for t in m.documents}  # v was built from these: never held out
        if m.heldout_corpus == SYNTHETIC:
            docs = self._synthetic_heldout_stories()
        else:
            docs = [d["text"] for d in load_documents(m.heldout_corpus, "text") if "text" in d]
        return [d for d in docs if d.strip() not in train]

    def _synthetic_heldout_stories(self) -> List[str]:
        """measurement.heldout_corpus: synthetic. Stories about the probe word, written by the base model from a prompt
        and sampling stream the training corpus does not use, so each holds probe positions v never saw. Written once
        to the run folder with what they were made from, and rewritten when that changes (they are evaluation only,
        so they are not a stage: the retrain stage's fingerprint holds every setting they read)."""
        from ..atomic_io import read_json, write_json
        from .synthesize import synthesize_stories

        p, m, s, r = self.ctx, self.recipe.measurement, self.recipe.synthesize, self.recipe.run
        made_from = {"model": r.model, "seed": r.seed, "probe": m.probe.strip(), "n": m.heldout_corpus_docs,
                     "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p}
        path = p.folder.heldout_corpus
        if path.is_file() and read_json(path).get("made_from") == made_from:
            return read_json(path)["documents"]
        docs = synthesize_stories(p.base_model, p.tokenizer, m.heldout_corpus_docs, s.max_new_tokens, s.temperature,
                                  s.top_p, s.batch_size, [m.probe.strip()], r.seed + HELDOUT_SEED_OFFSET, p.progress)
        if is_main():
            write_json(path, {"made_from": made_from, "documents": docs})
        return docs

    def observe(self, model, name: str) -> dict:
        from .observations import observe

        r = self.recipe.run
        return observe(model, self.ctx.tokenizer, self.recipe.measurement, self.recipe.evaluate, name,
                       max_length=r.max_length, seed=r.seed, heldout_corpus_documents=self.heldout_corpus_documents)

    def validate(self, upto: str) -> None:
        from ..stages import reaches

        p = self.ctx
        if not self.synthetic():
            _ = p.documents
        _ = p.base_model
        if not self.synthetic():
            _ = p.dataset  # tokenisation errors (long documents, nothing trained) before anything is written
        if reaches(upto, "measure"):
            _ = p.measurement
        if reaches(upto, "retrain"):
            self._check_heldout()

    def _check_heldout(self) -> None:
        """Evaluation needs a held-out measurement set that shares nothing with the one v was built from."""
        m = self.recipe.measurement
        if m.kind == "callable":
            used, held = m.documents, m.heldout_documents
        else:
            used, held = (m.documents, m.heldout_documents) if m.kind == "contrastive" else (m.prompts, m.heldout_prompts)
        if not held:
            field_name = "heldout_prompts" if m.kind == "completion" else "heldout_documents"
            raise MeasurementError(f"Evaluation needs a held-out measurement set: add measurement.{field_name} "
                                   f"(prompts or documents not used to build v).")
        overlap = sorted(set(s.strip() for s in used) & set(s.strip() for s in held))
        if overlap:
            raise ConfigError(f"{len(overlap)} held-out measurement item(s) also appear in the measurement set "
                              f"(e.g. {overlap[0][:60]!r}); held-out items must be new.")
        _ = build_measurement(m, self.ctx.tokenizer, self.recipe.run.max_length, heldout=True)
        if m.heldout_corpus == SYNTHETIC and not (self.synthetic() and self.recipe.synthesize.mode == "stories"):
            raise ConfigError("measurement.heldout_corpus: synthetic writes evaluation-only stories with the synthesize "
                              "section's settings: it needs corpus: synthetic and synthesize.mode: stories (or point "
                              "heldout_corpus at a file of documents outside the training corpus).")
        if m.heldout_corpus:
            from .measurement import probe_occurrences

            if m.kind != "contrastive":
                raise ConfigError("measurement.heldout_corpus collects probe positions, so it needs kind: contrastive.")
            docs = self.heldout_corpus_documents
            if not docs:
                raise MeasurementError(f"Every document of measurement.heldout_corpus {m.heldout_corpus} is also in the "
                                       f"training corpus; point it at documents outside it.")
            try:
                probe_occurrences(self.ctx.tokenizer, docs, m.probe)  # no probe occurrence: a clear error now
            except MeasurementError:
                where = (f"the {len(docs)} stories the model wrote for evaluation" if m.heldout_corpus == SYNTHETIC
                         else f"the {len(docs)} documents of {m.heldout_corpus}")
                raise MeasurementError(f"measurement.heldout_corpus: the probe {m.probe.strip()!r} occurs in none of "
                                       f"{where}; give documents that contain it (or more: heldout_corpus_docs), or "
                                       f"remove measurement.heldout_corpus.") from None

    @staticmethod
    def evaluate(pipe) -> None:
        """The evaluate stage: a function of the pipeline (it reads every arm's observations), like the core's."""
        from .evaluation import evaluate_run

        evaluate_run(pipe)
