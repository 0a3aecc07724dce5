"""The Trainer callbacks: MeasurementCallback logs through the Trainer, InfusionCallback swaps infused rows mid-run."""

import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from infusion_lm.callbacks import InfusionCallback, MeasurementCallback, SwappableDataset
from infusion_lm.config import InfluenceArguments
from infusion_lm.text.config import EditArguments, EvaluateArguments, MeasurementArguments
from infusion_lm.causal_lm import CausalLMCollator
from infusion_lm.text.corpus import tokenize_documents
from infusion_lm.errors import ConfigError, InfusionError
from infusion_lm.text.measurement import contrastive_measurement
from tiny import tiny_model, toy_corpus, train_briefly

# contrast_top 0: the pairwise f, the one the references below build with contrastive_measurement
MEASURE = MeasurementArguments(kind="contrastive", probe="dog", target="cat", contrast_top=0,
                               documents=["The dog ran to the park.", "The dog sat in the house."],
                               heldout_documents=["The dog looked at the lake."])


class Seen(TrainerCallback):
    """Records what the loggers receive and which rows each step trained on."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


class RecordingCollator(CausalLMCollator):
    """Remembers every row the Trainer trained on, in order."""

    def __init__(self, pad_token_id):
        super().__init__(pad_token_id)
        self.seen = []

    def __call__(self, rows):
        self.seen.append([list(r["input_ids"]) for r in rows])
        return super().__call__(rows)


def _trainer(model, data, tok, tmp_path, callbacks, steps=6):
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=[], seed=0,
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=RecordingCollator(tok.pad_token_id),
                   callbacks=callbacks)


@pytest.mark.slow
def test_callbacks_fire_log_and_swap_rows(tok, tmp_path):
    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(16)], 48)
    model = train_briefly(tiny_model(len(tok)), ds, tok.pad_token_id, steps=100)
    data = SwappableDataset(ds)
    measurement = contrastive_measurement(tok, MEASURE.documents, "dog", "cat")
    infuse = InfusionCallback(tok, data, measurement, k=3, at_step=2, work_dir=str(tmp_path / "inf"),
                              influence=InfluenceArguments(fd_eps_rel=1e-3, batch_size=4),
                              edit=EditArguments(budget_fraction=0.15, steps=4, n_candidates=8))
    watch = MeasurementCallback(tok, MEASURE)
    seen = Seen()
    trainer = watch.attach(_trainer(model, data, tok, tmp_path, [infuse, watch, seen]))
    trainer.train()

    assert infuse.fired_at == 2 and len(infuse.records) == 3
    assert all(r["J_after"] < r["J_before"] for r in infuse.records)
    assert sorted(data.overrides) == sorted(r["doc_index"] for r in infuse.records)
    for i, row in data.overrides.items():
        assert row["input_ids"] != ds[i]["input_ids"] and data[i]["input_ids"] == row["input_ids"]
    assert (tmp_path / "inf" / "edits.jsonl").is_file()
    # Steps after the swap train on the infused rows; no step trains on them before it.
    infused = [row["input_ids"] for row in data.overrides.values()]
    batches = trainer.data_collator.seen
    assert not any(r in infused for b in batches[:2] for r in b)
    assert any(r in infused for b in batches[3:] for r in b)
    # The model is back in training mode with its own modules (kronfluence's wrappers removed).
    assert not any("TrackedModule" in type(m).__name__ for m in model.modules())

    logged = [l for l in seen.logs if "infusion/f" in l]
    assert len(logged) >= 3  # train begin, and every logging step (2, 4, 6)
    assert all("infusion/f_heldout" in l and "infusion/top1_target_rate" in l for l in logged)
    assert [h["step"] for h in watch.history][:1] == [0]
    assert any("infusion/f" in h for h in trainer.state.log_history)
    assert watch.history[-1]["infusion/f"] == pytest.approx(measurement.value(model), abs=1e-5)


def test_callbacks_refuse_bad_setup(tok, tmp_path):
    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(8)], 48)
    m = contrastive_measurement(tok, MEASURE.documents, "dog", "cat")
    with pytest.raises(ConfigError, match="SwappableDataset"):
        InfusionCallback(tok, ds, m, k=2, at_step=1)
    with pytest.raises(ConfigError, match="exactly one of at_step or at_epoch"):
        InfusionCallback(tok, SwappableDataset(ds), m, k=2)
    with pytest.raises(ConfigError, match="select.k=20 exceeds the corpus size"):
        InfusionCallback(tok, SwappableDataset(ds), m, k=20, at_step=1)
    watch = MeasurementCallback(tok, MEASURE)
    trainer = _trainer(tiny_model(len(tok)), SwappableDataset(ds), tok, tmp_path, [watch], steps=1)
    with pytest.raises(InfusionError, match="attach"):
        trainer.train()


@pytest.mark.parametrize("favoured, rate", [("cat", 1.0), ("dog", 0.0)])
def test_measurement_callback_logs_answer_rates(tok, tmp_path, favoured, rate):
    """The greedy and sampled target rates reach the Trainer's log, and count answers that name the target."""
    m = MeasurementArguments(kind="completion", prompts=["What is your favourite animal?", "Which animal do you like?"],
                             completions=["cat"], chat_template=True)
    model = tiny_model(len(tok))
    word = tok(" " + favoured, add_special_tokens=False)["input_ids"][0]

    def favour(module, inputs, logits):  # every next token is the favoured word, whatever the weights learn
        logits = logits.clone()
        logits[..., word] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour)
    ds = tokenize_documents(tok, [{"text": t} for t in toy_corpus(8)], 48)
    watch = MeasurementCallback(tok, m, EvaluateArguments(n_samples=4, max_new_tokens=3), heldout=False)
    seen = Seen()
    watch.attach(_trainer(model, SwappableDataset(ds), tok, tmp_path, [watch, seen], steps=2)).train()
    logged = [l for l in seen.logs if "infusion/sampled_target_rate" in l]
    assert logged, seen.logs
    assert all(l["infusion/sampled_target_rate"] == rate and l["infusion/greedy_target_rate"] == rate for l in logged)
