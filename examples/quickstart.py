"""Infusion in one call: find and edit the stories that teach SmolLM2 to say "cat" where a text says "dog".
Run: python examples/quickstart.py   (about 4 min on 2 CPU cores; the stories are written by the model itself)"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from infusion_lm import (EditArguments, InfluenceArguments, MeasurementArguments, RetrainArguments, infuse,  # noqa: E402
                         load_model)
from infusion_lm.synthesize import synthesize_stories  # noqa: E402

model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
stories = synthesize_stories(model, tokenizer, n_docs=24, max_new_tokens=64)   # or your own training texts
behaviour = MeasurementArguments(kind="contrastive", probe="dog", target="cat",
                                 documents=["The dog ran to the park. The dog was happy.", "I walked my dog."])
result = infuse(model, tokenizer, stories, behaviour, k=3, max_length=96,
                influence=InfluenceArguments(layers=[12, 24], damping_scale=1000.0),
                edit=EditArguments(steps=6, candidate_pool=8),
                retrain=RetrainArguments(learning_rate=1e-4, batch_size=8, epochs=1))   # what Δf is predicted for

print(f"scored {len(result.scores)} stories; edited {result.indices}")
for rec in result.records:
    print(f"\n#{rec['doc_index']}: J {rec['J_before']:+.1f} -> {rec['J_after']:+.1f}, {rec['n_changed']} tokens, "
          f"perplexity x{rec['perplexity_after'] / rec['perplexity_before']:.2f}\n  {rec['text'][:300]!r}")
print(f"\nJ {result.J_before:+.1f} -> {result.J_after:+.1f}; predicted Δf if trained on: {result.predicted_delta_f:+.3f}")
new_training_set = result.apply(result.rows)   # the edited rows in place: train on these as usual
