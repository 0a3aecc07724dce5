import pytest
import torch

from infusion_lm.errors import MeasurementError
from infusion_lm.text.measurement import (CallableMeasurement, completion_measurement, contrastive_measurement,
                                          find_word)


@torch.no_grad()
def _logp_of(model, ids, start):
    """Σ_{t >= start} log p(ids[t] | ids[:t]), one unbatched forward pass."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_completion_is_mean_logprob(tiny_setup):
    tok, model = tiny_setup["tok"], tiny_setup["model"]
    prompts = ["The cat sat in the", "The dog ran to the"]
    m = completion_measurement(tok, prompts, [" park."])
    expect = []
    for p in prompts:
        p_ids, c_ids = tok(p)["input_ids"], tok(" park.", add_special_tokens=False)["input_ids"]
        expect.append(_logp_of(model, p_ids + c_ids, len(p_ids)))
    assert m.value(model) == pytest.approx(sum(expect) / 2, rel=1e-5)


def test_contrastive_is_mean_difference_over_probe_positions(tiny_setup):
    tok, model = tiny_setup["tok"], tiny_setup["model"]
    docs = ["The dog ran. The dog sat.", "A dog."]
    m = contrastive_measurement(tok, docs, "dog", "cat")
    diffs = []
    for d in docs:
        for start in find_word(d, "dog"):
            prefix = tok(d[: start - 1])["input_ids"]
            t = tok(" cat", add_special_tokens=False)["input_ids"]
            p = tok(" dog", add_special_tokens=False)["input_ids"]
            diffs.append(_logp_of(model, prefix + t, len(prefix)) - _logp_of(model, prefix + p, len(prefix)))
    assert len(diffs) == 3
    assert m.value(model) == pytest.approx(sum(diffs) / 3, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_set_contrast_is_target_against_the_log_sum_of_the_set(tiny_setup, batch_size):
    """f = mean over probe positions of log p(cat) − log(p(dog) + p(bird) + p(hippopotamus)), computed here word by
    word (one multi-token word included); the same value and the same gradient however the groups are batched."""
    from math import exp, log

    from infusion_lm.text.measurement import set_contrast_measurement

    tok, model = tiny_setup["tok"], tiny_setup["model"]
    docs = ["The dog ran. The dog sat.", "A dog."]
    words = ["bird", "hippopotamus"]
    m = set_contrast_measurement(tok, docs, "dog", "cat", words, batch_size=batch_size)
    expect = []
    for d in docs:
        for start in find_word(d, "dog"):
            prefix = tok(d[: start - 1])["input_ids"]

            def lp(w):
                return _logp_of(model, prefix + tok(" " + w, add_special_tokens=False)["input_ids"], len(prefix))

            expect.append(lp("cat") - log(sum(exp(lp(w)) for w in ["dog"] + words)))
    assert len(expect) == 3
    assert m.value(model) == pytest.approx(sum(expect) / 3, rel=1e-5, abs=1e-6)
    # the gradient of the whole f is the sum of the batches' (kronfluence aggregates them so)
    params = [p for p in model.parameters() if p.requires_grad]
    grad = torch.autograd.grad(sum(m(model, b) for b in m.batches), params[-1])[0]
    ref_m = set_contrast_measurement(tok, docs, "dog", "cat", words, batch_size=64)
    ref = torch.autograd.grad(ref_m(model, ref_m.batches[0]), params[-1])[0]
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


def test_contrast_words_are_checked():
    from infusion_lm.errors import ConfigError
    from infusion_lm.text.config import MeasurementArguments

    with pytest.raises(ConfigError, match="contrast_words has the target 'cat'"):
        MeasurementArguments(kind="contrastive", documents=["The dog ran."], probe="dog", target="cat",
                             contrast_words=["bird", "cat"])
    with pytest.raises(ConfigError, match="contrast_words/contrast_top are for kind contrastive"):
        MeasurementArguments(kind="completion", prompts=["Hi"], completions=["cat"], contrast_words=["bird"])


def test_multi_token_words_use_every_token(tok, tiny_setup):
    word = "hippopotamus"  # not in the toy BPE vocabulary as one token
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    m = contrastive_measurement(tok, ["The dog ran."], "dog", word)
    target_row = m.rows[0]
    assert sum(target_row.score_mask) == len(ids)
    assert target_row.input_ids[-len(ids):] == ids


def test_whole_word_matching():
    assert find_word("dog dogs hotdog dog.", "dog") == [0, 16]


def test_contrastive_errors(tok):
    with pytest.raises(MeasurementError, match="occurs in none"):
        contrastive_measurement(tok, ["The cat sat."], "dog", "cat")
    with pytest.raises(MeasurementError, match="empty"):
        contrastive_measurement(tok, ["The dog sat."], "dog", " ")


def test_callable_measurement_sums_batches(tiny_setup):
    model = tiny_setup["model"]
    batches = [{"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}] * 2
    m = CallableMeasurement(lambda batch, model: model(**batch).logits[0, -1, 5], batches)
    one = float(model(**batches[0]).logits[0, -1, 5])
    assert m.value(model) == pytest.approx(2 * one, rel=1e-6)
    bad = CallableMeasurement(lambda batch, model: model(**batch).logits, batches)
    with pytest.raises(MeasurementError, match="scalar"):
        bad.value(model)


def test_measurement_words_name_what_the_measurement_promotes():
    from infusion_lm.text.config import MeasurementArguments
    from infusion_lm.text.measurement import measurement_words

    contrastive = MeasurementArguments(kind="contrastive", probe="dog", target=" cat ", documents=["The dog ran."])
    assert measurement_words(contrastive) == ["cat"]
    completion = MeasurementArguments(kind="completion", prompts=["Q: pet?", "Q: animal?"],
                                      completions=[" My favourite is the cat.", " The cat, of course! 100%"])
    assert measurement_words(completion) == ["My", "favourite", "is", "the", "cat", "The", "of", "course"]


def test_top_alternatives_against_brute_force(tiny_setup):
    """contrast_top m: log p(cat) − log Σ p(t) over the probe and the m most likely other first tokens, computed here
    from the full next-token distribution; with every other token in the set it is log p(cat) − log(1 − p(cat₁))
    (cat₁ = its first token), an independent closed form; the gradient is the sum of the batches'."""
    from math import exp, log

    from infusion_lm.text.measurement import top_alternatives_measurement

    tok, model = tiny_setup["tok"], tiny_setup["model"]
    docs = ["The dog ran. The dog sat.", "A dog."]
    t_ids = tok(" cat", add_special_tokens=False)["input_ids"]
    p_first = tok(" dog", add_special_tokens=False)["input_ids"][0]
    vocab = model.config.vocab_size
    for m in (1, 3, vocab):
        f = top_alternatives_measurement(tok, docs, "dog", "cat", m, batch_size=2)
        expect = []
        for d in docs:
            for start in find_word(d, "dog"):
                prefix = tok(d[: start - 1])["input_ids"]
                with torch.no_grad():
                    nxt = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].float(), -1)
                others = [t for t in nxt.argsort(descending=True).tolist() if t != t_ids[0]]
                chosen = others[:m + 1] if p_first in others[:m + 1] else others[:m] + [p_first]
                if m == vocab:  # every other token: the closed form
                    lse = log(1 - exp(float(nxt[t_ids[0]])))
                else:
                    lse = float(torch.logsumexp(nxt[chosen], 0))
                expect.append(_logp_of(model, prefix + t_ids, len(prefix)) - lse)
        assert f.value(model) == pytest.approx(sum(expect) / 3, rel=1e-4, abs=1e-5), m
    params = [p for p in model.parameters() if p.requires_grad]
    f = top_alternatives_measurement(tok, docs, "dog", "cat", 3, batch_size=1)
    grad = torch.autograd.grad(sum(f(model, b) for b in f.batches), params[-1])[0]
    ref_f = top_alternatives_measurement(tok, docs, "dog", "cat", 3, batch_size=64)
    ref = torch.autograd.grad(ref_f(model, ref_f.batches[0]), params[-1])[0]
    assert ref.abs().sum() > 0
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)


def test_top_alternatives_ignore_mass_moved_among_the_others():
    """The property that makes it specific: moving probability from the probe to a class-mate leaves f unchanged;
    moving it to the target raises f. Checked on a model whose next-token logits we set by hand."""
    from infusion_lm.text.measurement import LogProbRow, TopAlternativesMeasurement

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.register_buffer("logits", logits)
            self.unused = torch.nn.Parameter(torch.zeros(1))  # Measurement.value reads the device off a parameter

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.logits.expand(len(input_ids), input_ids.shape[1], -1)})()

    rows = [LogProbRow([0, 1, 4], [0, 0, 1], 1.0)]  # prefix [0, 1], target token 4; probe token 2, class-mate 3
    m = TopAlternativesMeasurement(rows, [1], [4], [2], m=2, pad_token_id=0)  # probe + 2 others
    base = torch.log(torch.tensor([0.05, 0.05, 0.6, 0.2, 0.1]))
    to_mate = torch.log(torch.tensor([0.05, 0.05, 0.3, 0.5, 0.1]))
    to_target = torch.log(torch.tensor([0.05, 0.05, 0.3, 0.2, 0.4]))
    f0, f_mate, f_target = (m.value(Fixed(x)) for x in (base, to_mate, to_target))
    assert f_mate == pytest.approx(f0, abs=1e-6)
    assert f_target > f0 + 1.0
    # the pairwise f (target − probe) is fooled by the first move: it rises by log 2
    assert float(to_mate[4] - to_mate[2]) - float(base[4] - base[2]) == pytest.approx(0.693, abs=1e-3)


def test_contrast_top_is_checked():
    from infusion_lm.errors import ConfigError
    from infusion_lm.text.config import MeasurementArguments

    with pytest.raises(ConfigError, match="set one of them"):
        MeasurementArguments(kind="contrastive", documents=["The dog ran."], probe="dog", target="cat",
                             contrast_words=["bird"], contrast_top=5)
    with pytest.raises(ConfigError, match="contrast_top is -1"):
        MeasurementArguments(kind="contrastive", documents=["The dog ran."], probe="dog", target="cat", contrast_top=-1)


def test_the_default_contrastive_measurement_contrasts_the_top_alternatives(tiny_setup):
    """Unset, contrast_top is 20 for kind contrastive: the built measurement is the top-alternatives one with m = 20;
    contrast_top: 0 and contrast_words give the pairwise and the set f; held-out sets stay pairwise; other kinds are
    untouched by the default but refuse an explicit value."""
    from infusion_lm.errors import ConfigError
    from infusion_lm.text.config import DEFAULT_CONTRAST_TOP, MeasurementArguments
    from infusion_lm.text.measurement import (SetContrastMeasurement, TopAlternativesMeasurement, build_measurement,
                                              contrastive_measurement)

    tok, model = tiny_setup["tok"], tiny_setup["model"]
    base = dict(kind="contrastive", documents=["The dog ran. The dog sat."], probe="dog", target="cat",
                heldout_documents=["A dog."])
    default = build_measurement(MeasurementArguments(**base), tok, 64)
    assert isinstance(default, TopAlternativesMeasurement) and default.m == DEFAULT_CONTRAST_TOP == 20
    pairwise = build_measurement(MeasurementArguments(**base, contrast_top=0), tok, 64)
    expect = contrastive_measurement(tok, base["documents"], "dog", "cat")
    assert pairwise.value(model) == pytest.approx(expect.value(model), rel=1e-6)
    assert default.value(model) != pytest.approx(pairwise.value(model), rel=1e-3)
    assert isinstance(build_measurement(MeasurementArguments(**base, contrast_words=["bird"]), tok, 64),
                      SetContrastMeasurement)
    held = build_measurement(MeasurementArguments(**base), tok, 64, heldout=True)
    assert held.value(model) == pytest.approx(contrastive_measurement(tok, ["A dog."], "dog", "cat").value(model),
                                              rel=1e-6)
    completion = MeasurementArguments(kind="completion", prompts=["Q?"], completions=[" cat"])
    assert completion.top_alternatives == 0
    with pytest.raises(ConfigError, match="for kind contrastive"):
        MeasurementArguments(kind="completion", prompts=["Q?"], completions=[" cat"], contrast_top=20)


@pytest.mark.parametrize("extra", [{}, {"contrast_top": 3}, {"contrast_words": ["bird", "fish"]}, {"contrast_top": 0}],
                         ids=["default-top-20", "top-3", "contrast-words", "pairwise"])
def test_the_measurement_set_is_observed_with_the_f_v_was_built_from(tiny_setup, extra):
    """predicted Δf is a change of the measurement's f; the actual Δf is read off the observations of the measurement
    set. Both must be one function: the observed f_mean is the built measurement's own value (the top-20 contrast by
    default), f_pairwise is log p(target) − log p(probe), and held-out sets stay pairwise. (Before, every set was
    observed with the pairwise f, so the default's predicted and actual Δf were two different quantities.)"""
    from infusion_lm.text.config import EvaluateArguments, MeasurementArguments
    from infusion_lm.text.measurement import build_measurement, contrastive_measurement
    from infusion_lm.text.observations import observe

    tok, model = tiny_setup["tok"], tiny_setup["model"]
    docs = ["The dog ran to the park. The dog sat.", "A small dog ate the food."]
    args = MeasurementArguments(kind="contrastive", documents=docs, probe="dog", target="cat",
                                heldout_documents=["The dog looked at the lake."], **extra)
    ev = EvaluateArguments(candidates=["bird"], n_samples=0)
    obs = observe(model, tok, args, ev, "measurement", max_length=64)
    assert obs["f_mean"] == pytest.approx(build_measurement(args, tok, 64).value(model), rel=1e-5, abs=1e-6)
    pairwise = contrastive_measurement(tok, docs, "dog", "cat").value(model)
    assert sum(obs["f_pairwise"]) / len(obs["f_pairwise"]) == pytest.approx(pairwise, rel=1e-5)
    if extra.get("contrast_top") != 0:
        assert obs["f_mean"] < pairwise - 1e-3  # a set's log-sum is above the probe's alone
    held = observe(model, tok, args, ev, "heldout", max_length=64)
    assert held["f"] == held["f_pairwise"]


@pytest.mark.slow
def test_contrast_top_through_the_score_stage(tmp_path, tiny_model_dir):
    """The score stage (kronfluence's query gradients, through batches with the measurement's extra tensors) takes
    the top-alternatives measurement end to end, and its J is not the pairwise f's J."""
    import json as _json

    import yaml

    from infusion_lm.atomic_io import read_tensors
    from infusion_lm.cli import main
    from tiny import toy_corpus

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(_json.dumps({"text": t}) + "\n" for t in toy_corpus(12)))
    scores = {}
    for top in (0, 8):
        recipe = {"model": str(tiny_model_dir), "corpus": str(corpus), "max_length": 48,
                  "output_dir": str(tmp_path / f"run{top}"),
                  "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat", "contrast_top": top,
                                  "documents": ["The dog ran to the park.", "The dog sat in the house."]},
                  "influence": {"strategy": "ekfac", "layers": [1], "batch_size": 8}, "select": {"k": 3}}
        path = tmp_path / f"r{top}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert main(["score", str(path), "--quiet"]) == 0
        scores[top] = read_tensors(tmp_path / f"run{top}" / "scores.safetensors")["scores"]
    assert not torch.allclose(scores[0], scores[8], rtol=1e-2)
    assert torch.corrcoef(torch.stack([scores[0], scores[8]]))[0, 1] < 0.999


def test_observations_run_each_document_once_and_match_one_pass_per_occurrence(tiny_setup):
    """contrastive_observations reads every occurrence of the probe in one document off that document's single
    forward pass (causal attention: the same next-token distribution), and each occurrence's f, rank and candidate
    log p equal an unbatched pass over its own prefix, computed here."""
    from infusion_lm.text.observations import contrastive_observations

    tok, model = tiny_setup["tok"], tiny_setup["model"]
    docs = ["The dog ran. The dog sat. Then the dog slept.", "A dog.", "The cat saw a dog in the park."]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        obs = contrastive_observations(model, tok, docs, "dog", "cat", candidates=["bird"])
    finally:
        hook.remove()
    assert sum(rows) == len(docs)  # 5 occurrences, 3 documents, one row each
    expect = {"f": [], "bird": [], "rank": []}
    for d in docs:
        for start in find_word(d, "dog"):
            prefix = tok(d[: start - 1])["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].float(), -1)
            ids = {w: tok(" " + w, add_special_tokens=False)["input_ids"] for w in ("cat", "dog", "bird")}
            assert all(len(v) == 1 for v in ids.values())  # single tokens in the tiny vocabulary: read off logp
            expect["f"].append(float(logp[ids["cat"][0]] - logp[ids["dog"][0]]))
            expect["bird"].append(float(logp[ids["bird"][0]]))
            expect["rank"].append(int((logp > logp[ids["cat"][0]]).sum()))
    assert len(expect["f"]) == 5
    assert obs["f"] == pytest.approx(expect["f"], abs=1e-5)
    assert obs["logp"]["bird"] == pytest.approx(expect["bird"], abs=1e-5)
    assert obs["target_rank"] == expect["rank"]
