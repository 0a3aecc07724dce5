"""Infusion inside your own Hugging Face ``Trainer`` run.

- :class:`MeasurementCallback` logs the behaviour (f, and the rate of target answers) at logging and evaluation steps,
  through the Trainer's own loggers (``report_to``: TensorBoard, W&B, ...).
- :class:`InfusionCallback` runs the Infusion pipeline on the current model at a chosen step or epoch (factors, v,
  scores, selection, edits) and swaps the infused documents into the training data for the remaining steps: partial
  retraining from inside your run. The training data must be a :class:`SwappableDataset`.

Example (runnable: ``python examples/trainer_callbacks.py``)::

    data = SwappableDataset(tokenized_corpus)            # rows with input_ids and labels
    infuse = InfusionCallback(tokenizer, data, measurement, k=4, at_epoch=1)
    watch = MeasurementCallback(tokenizer, recipe.measurement)
    trainer = Trainer(model, args, train_dataset=data, data_collator=CausalLMCollator(pad_id), callbacks=[infuse, watch])
    watch.attach(trainer)                                # logs go through trainer.log, so every logger sees them
    trainer.train()
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from transformers import TrainerCallback

from .config import InfluenceArguments, SelectArguments
from .text.config import EditArguments, EvaluateArguments, MeasurementArguments
from .errors import ConfigError, InfusionError
from .run_folder import EditFolder
from .atomic_io import atomic_path

logger = logging.getLogger(__name__)


class SwappableDataset(torch.utils.data.Dataset):
    """A training set whose rows can be replaced by index while training runs (the DataLoader reads rows lazily)."""

    def __init__(self, base):
        self.base = base
        self.overrides: Dict[int, Mapping] = {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        row = self.overrides.get(int(i))
        if row is None:
            row = self.base[int(i)]
        return {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}

    def replace(self, i: int, row: Mapping) -> None:
        self.overrides[int(i)] = {"input_ids": list(row["input_ids"]), "labels": list(row["labels"])}

    def rows(self) -> List[Dict]:
        return [self[i] for i in range(len(self))]


class MeasurementCallback(TrainerCallback):
    """Logs ``{prefix}/f`` (and ``{prefix}/f_heldout``, target rates) whenever the Trainer logs or evaluates.

    For a completion measurement the rates are the share of answers that name the completion as a whole word:
    ``greedy_target_rate`` (one greedy answer per prompt) and ``sampled_target_rate`` (``evaluate.n_samples``
    sampled answers per prompt; 0 samples logs no sampled rate)."""

    def __init__(self, tokenizer, measurement: MeasurementArguments, evaluate: Optional[EvaluateArguments] = None,
                 heldout: bool = True, prefix: str = "infusion", max_length: int = 512):
        if measurement.kind is None:
            raise ConfigError("MeasurementCallback needs a measurement with a `kind`.")
        self.tok = tokenizer
        self.measurement = measurement
        self.evaluate = evaluate or EvaluateArguments(n_samples=0)
        self.heldout = heldout and bool(measurement.heldout_documents or measurement.heldout_prompts)
        self.prefix = prefix
        self.max_length = max_length
        self.trainer = None
        self.history: List[Dict] = []

    def attach(self, trainer):
        """Binds to the trainer (adding itself if it was not passed in ``callbacks``); returns the trainer."""
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self.trainer = trainer
        return trainer

    def metrics(self, model) -> Dict[str, float]:
        from .text.observations import observe, target_rates

        out = {}
        for name, held in (("", False), ("_heldout", True)) if self.heldout else (("", False),):
            obs = observe(model, self.tok, self.measurement, self.evaluate, "heldout" if held else "measurement",
                          max_length=self.max_length)
            out[f"{self.prefix}/f{name}"] = obs["f_mean"]
            if "top1_is_target" in obs:
                out[f"{self.prefix}/top1_target_rate{name}"] = sum(obs["top1_is_target"]) / len(obs["top1_is_target"])
            for kind, rate in target_rates(obs).items():  # no sampled rate when evaluate.n_samples is 0
                out[f"{self.prefix}/{kind}_target_rate{name}"] = rate
        return out

    def _emit(self, state, model):
        if self.trainer is None:
            raise InfusionError("MeasurementCallback is not attached: call callback.attach(trainer) after building "
                                "the Trainer, so its metrics reach the Trainer's loggers.")
        m = self.metrics(model)
        self.history.append({"step": state.global_step, **m})
        self.trainer.log(m)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._emit(state, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if control.should_log:
            self._emit(state, model)

    def on_evaluate(self, args, state, control, model=None, **kw):
        self._emit(state, model)


class InfusionCallback(TrainerCallback):
    """At ``at_step`` (or the end of epoch ``at_epoch``), infuses the training data of the running Trainer.

    Runs on the current weights: EK-FAC factors over the current training rows, v for the measurement, J(z) for every
    row, the k most negative, and the editor; the edited rows replace the originals in the SwappableDataset, so the
    remaining steps train on the infused corpus. The edit records are in ``self.records`` and ``work_dir/edits.jsonl``.
    """

    def __init__(self, tokenizer, dataset: SwappableDataset, measurement, k: int = 8, at_step: Optional[int] = None,
                 at_epoch: Optional[int] = None, influence: Optional[InfluenceArguments] = None,
                 edit: Optional[EditArguments] = None, work_dir: Optional[str] = None):
        if not isinstance(dataset, SwappableDataset):
            raise ConfigError("InfusionCallback needs the Trainer's train_dataset to be a SwappableDataset "
                              "(wrap your tokenized corpus: SwappableDataset(rows)).")
        if (at_step is None) == (at_epoch is None):
            raise ConfigError("InfusionCallback needs exactly one of at_step or at_epoch.")
        from .pipeline import check_k

        check_k(SelectArguments(k=k).k, len(dataset))  # the bounds of select.k, checked where the recipe's are
        self.tok = tokenizer
        self.dataset = dataset
        self.measurement = measurement
        self.k = k
        self.at_step, self.at_epoch = at_step, at_epoch
        self.influence = influence or InfluenceArguments()
        self.edit = edit or EditArguments()
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="infusion_callback_"))
        self.records: List[Dict] = []
        self.result = None  # the InfusionResult, once fired
        self.fired_at: Optional[int] = None

    def infuse(self, model) -> List[Dict]:
        """Runs :func:`infusion_lm.infuse` on the current weights and rows, and swaps the edits in."""
        from .api import infuse

        result = infuse(model, self.tok, self.dataset.rows(), self.measurement, k=self.k, influence=self.influence,
                        edit=self.edit, work_dir=str(self.work_dir), progress=False)
        for c, row in zip(result.indices, result.edited_rows):
            self.dataset.replace(c, row)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(EditFolder(self.work_dir).edits) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in result.records), encoding="utf-8")
        self.result = result
        return result.records

    def _fire(self, state, model):
        if self.fired_at is not None:
            return
        self.fired_at = state.global_step
        logger.info("InfusionCallback: infusing %d documents at step %d", self.k, state.global_step)
        self.records = self.infuse(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.at_step is not None and state.global_step >= self.at_step:
            self._fire(state, model)

    def on_epoch_end(self, args, state, control, model=None, **kw):
        if self.at_epoch is not None and round(state.epoch or 0) >= self.at_epoch:
            self._fire(state, model)
