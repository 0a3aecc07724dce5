"""Infusion in three calls: edit the stories that teach SmolLM2 to say "cat" where a text says "dog", retrain on them
beside an unedited control, and compare. Run: python examples/quickstart.py   (12 min on 2 CPU cores shared with
two other jobs: held-out Δf +0.155 [+0.130, +0.178] over 2 seeds, predicted +0.147)"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from infusion_lm import (EditArguments, InfluenceArguments, MeasurementArguments, RetrainArguments,  # noqa: E402
                         compare, infuse, load_model, retrain_arms)
from infusion_lm.text.synthesize import synthesize_stories  # noqa: E402

model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
stories = synthesize_stories(model, tokenizer, n_docs=24, max_new_tokens=64)   # or your own training texts
behaviour = MeasurementArguments(kind="contrastive", probe="dog", target="cat",
                                 documents=["The dog ran to the park. The dog was happy.", "I walked my dog."],
                                 heldout_documents=["Sam walked his dog to the lake. The dog jumped in."])
training = RetrainArguments(learning_rate=1e-4, batch_size=8, epochs=1)   # the fine-tuning that will follow
result = infuse(model, tokenizer, stories, behaviour, k=3, max_length=96, retrain=training,
                influence=InfluenceArguments(layers=[12, 24], damping_scale=1000.0),
                edit=EditArguments(steps=6, candidate_pool=8))
for rec in result.records:
    print(f"#{rec['doc_index']}: J {rec['J_before']:+.1f} -> {rec['J_after']:+.1f}, {rec['n_changed']} tokens changed: "
          f"{rec['text'][:160]!r}")

arms = {"control": result.rows, "infused": result.apply()}
observed = retrain_arms(model, tokenizer, arms, behaviour, retrain=training, seeds=(0, 1))
for name, d in compare(observed)["infused"].items():   # set → SetComparison; d.delta_f is a Delta
    print(f"{name}: Δf {d.delta_f} (predicted {result.predicted_delta_f:+.3f})")
