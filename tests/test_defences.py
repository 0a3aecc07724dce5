"""The defences a defender runs without the attacker: ONION's word scores (against deleting the word from the text
and rescoring by hand), that ONION finds an out-of-place word, the defender's filter, and the grammar check."""

import math

import pytest
import torch

from infusion_lm.text.onion import defended_row, onion_report, onion_scores, threshold, word_spans
from tiny import toy_corpus


def _rows(tok, texts):
    from infusion_lm.text.corpus import tokenize_documents

    ds = tokenize_documents(tok, [{"text": t} for t in texts], 64)
    return [ds[i] for i in range(len(ds))]


@torch.no_grad()
def _ppl_by_hand(model, tok, text):
    """exp(mean NLL) of the text's tokens and its end-of-text token, from the logits, one document at a time."""
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return math.exp(nll.item())


def test_onion_scores_equal_deleting_each_word_from_the_text_and_rescoring(tiny_setup):
    model, tok = tiny_setup["model"], tiny_setup["tok"]
    texts = toy_corpus(4, seed=3)
    got = onion_scores(model, tok, _rows(tok, texts), tok.pad_token_id, batch_size=5)
    for text, doc in zip(texts, got):
        words = text.split(" ")
        assert len(doc["spans"]) == len(words)  # a word per whitespace-separated word ("park." is one)
        base = _ppl_by_hand(model, tok, text)
        assert doc["perplexity"] == pytest.approx(base, rel=1e-5)
        for i, score in enumerate(doc["scores"]):
            # deleting a word's tokens deletes the word and the space before it (the first word: the word alone)
            variant = " ".join(words[1:]) if i == 0 else " ".join(words[:i] + words[i + 1:])
            variant = (" " + variant) if i == 0 else variant
            assert score == pytest.approx(base - _ppl_by_hand(model, tok, variant), rel=1e-4, abs=1e-4)


def _insert(text, word, rng):
    """The text with ``word`` inserted after a random word of its first sentence; the changed token positions."""
    words = text.split(" ")
    at = rng.randrange(1, 5)
    return " ".join(words[:at] + [word] + words[at:]), at


def test_onion_puts_a_word_that_does_not_belong_at_the_top(tiny_setup):
    import random

    model, tok = tiny_setup["model"], tiny_setup["tok"]
    rng = random.Random(0)
    clean_texts = toy_corpus(24, seed=11)
    clean_rows = _rows(tok, clean_texts)
    clean = dict(enumerate(onion_scores(model, tok, clean_rows, tok.pad_token_id)))
    records = []
    for i in range(12):
        text, at = _insert(clean_texts[i], "happy", rng)
        row = _rows(tok, [text])[0]
        spans = word_spans(tok, row["input_ids"], row["labels"])
        a, b = spans[at]
        assert tok.decode(row["input_ids"][a:b]).strip() == "happy"
        records.append({"doc_index": i, "changed_positions": list(range(a, b)), **row})
    edited = onion_scores(model, tok, records, tok.pad_token_id)
    cut = threshold(clean, 0.02)
    rep = onion_report(records, edited, clean, cut)
    # by chance a changed word tops its ~10-word document 1 time in 10
    assert rep["documents"] == 12 and rep["top1_hit_rate"] >= 0.75 and rep["top3_hit_rate"] >= 0.9
    assert rep["changed_word_auroc"] >= 0.9
    assert rep["document_auroc"] > rep["document_auroc_before_edit"] + 0.2
    assert rep["changed_words_removed"] > 5 * rep["clean_words_removed"]
    # the defender's copy of a document drops the word that tops its list, and keeps the rest
    j = next(k for k, d in enumerate(edited) if max(d["scores"]) > cut)
    kept = defended_row(records[j], edited[j], cut)
    top = max(range(len(edited[j]["scores"])), key=lambda w: edited[j]["scores"][w])
    a, b = edited[j]["spans"][top]
    assert kept["input_ids"] == records[j]["input_ids"][:a] + records[j]["input_ids"][b:]
    assert kept["labels"] == records[j]["labels"][:a] + records[j]["labels"][b:]


def test_the_cut_is_set_on_the_clean_corpus_at_its_removal_rate(tiny_setup):
    model, tok = tiny_setup["model"], tiny_setup["tok"]
    clean = dict(enumerate(onion_scores(model, tok, _rows(tok, toy_corpus(16, seed=5)), tok.pad_token_id)))
    words = sum(len(d["scores"]) for d in clean.values())
    for rate in (0.05, 0.2):
        cut = threshold(clean, rate)
        removed = sum(len(d["scores"]) - len(word_spans(tok, **defended_row(r, d, cut)))
                      for r, d in zip(_rows(tok, toy_corpus(16, seed=5)), clean.values()))
        assert abs(removed / words - rate) <= 2 / words + 0.01


def test_chat_prompts_are_not_words(tok):
    msgs = [{"role": "user", "content": "Your favourite animal?"}, {"role": "assistant", "content": "The dog ran."}]
    from infusion_lm.text.corpus import tokenize_documents

    row = tokenize_documents(tok, [{"messages": msgs}], 64)[0]
    spans = word_spans(tok, row["input_ids"], row["labels"])
    assert all(row["labels"][t] != -100 for a, b in spans for t in range(a, b))
    assert "".join(tok.decode(row["input_ids"][a:b]) for a, b in spans).strip().startswith("The dog ran.")


def test_an_unknown_defence_is_refused_with_the_choices():
    from infusion_lm.errors import ConfigError
    from infusion_lm.text.config import EvaluateArguments

    with pytest.raises(ConfigError, match="onion, grammar"):
        EvaluateArguments(defences=["onoin"])
    with pytest.raises(ConfigError, match="onion_removal_rate"):
        EvaluateArguments(onion_removal_rate=0.9)


def test_grammar_report_counts_sentences_an_edit_broke():
    from infusion_lm.text.grammar import INSTALL_HINT, GrammarCheck, grammar_report, load_link_grammar, sentences

    assert grammar_report([{"text": "a", "original_text": "a"}], None) == {"skipped": INSTALL_HINT}
    assert sentences('He ran. "Stop!" she said? Yes') == ["He ran.", '"Stop!"', "she said?", "Yes"]
    if load_link_grammar() is None:
        pytest.skip(INSTALL_HINT)
    check = GrammarCheck()
    before = "Tom had a dog. He was very happy. They played all day."
    recs = [{"original_text": before, "text": before.replace("very happy", "very ball")},
            {"original_text": before, "text": before.replace("Tom had", "Tim had")},
            {"original_text": before, "text": before.replace("Tom had a dog.", "Tom had sad to dog.")}]
    rep = grammar_report(recs, check)
    assert rep["sentences_made_unparseable"] == 2 and rep["documents_with_a_sentence_made_unparseable"] == pytest.approx(2 / 3)


def _run(tiny_setup, tmp_path, texts, rate=0.02):
    """What defended_corpus reads of a run: the recipe's cut, the run folder, the base model, tokenizer and corpus."""
    from types import SimpleNamespace

    tok = tiny_setup["tok"]
    recipe = SimpleNamespace(evaluate=SimpleNamespace(onion_removal_rate=rate, onion_clean_documents=None),
                             run=SimpleNamespace(seed=0))
    return SimpleNamespace(recipe=recipe, dir=tmp_path, base_model=tiny_setup["model"], tokenizer=tok,
                           dataset=_rows(tok, texts), stage_fingerprint=lambda stage: "fp")


def test_the_defended_corpus_drops_the_out_of_place_word_and_few_clean_ones(tiny_setup, tmp_path):
    import random

    from infusion_lm.text.defended import clean_onion, defended_corpus

    texts = toy_corpus(24, seed=11)
    run = _run(tiny_setup, tmp_path, texts, rate=0.02)
    received = [dict(r) for r in run.dataset]
    rng = random.Random(0)
    edited = {}
    for i in range(4):  # the attacker's edits: an out-of-place word in 4 documents
        text, at = _insert(texts[i], "happy", rng)
        received[i] = _rows(run.tokenizer, [text])[0]
        edited[i] = at
    kept, summary = defended_corpus(run, received, "infused")
    assert summary["documents_changed_by_the_arm"] == [0, 1, 2, 3]
    # the cut removes about 2% of the clean corpus's words, and most of the inserted ones
    assert summary["words_removed_elsewhere"] / summary["words_elsewhere"] <= 0.04
    assert summary["words_removed_in_those"] >= 3
    dropped = sum("happy" not in run.tokenizer.decode(kept[i]["input_ids"]).split()[edited[i]: edited[i] + 1]
                  for i in range(4))
    assert dropped >= 3
    # an unedited document is kept exactly as the cached clean scores and the cut say
    clean = clean_onion(run, range(len(texts)))
    assert len(list(tmp_path.glob("defences/onion-clean-*.json"))) == 1
    for i in range(4, len(texts)):
        n_words = len(word_spans(run.tokenizer, kept[i]["input_ids"], kept[i]["labels"]))
        assert n_words == len(clean[i]["scores"]) - sum(v > summary["threshold"] for v in clean[i]["scores"])


def test_the_headline_says_what_onion_does_to_each_edited_arm():
    from infusion_lm.evaluation import headline

    arm = lambda onion: {"heldout": {"delta_f": {"mean": 0.1, "ci": [0.0, 0.2]}}, **({"defences": onion} if onion else {})}
    res = {"primary_set": "heldout", "seeds": [0, 1, 2], "verdict_sentence": "verdict",
           "arms": {"infused": arm({"onion": {"documents": 4, "top3_hit_rate": 0.75, "changed_words": 9,
                                              "changed_words_removed": 5 / 9}}),
                    "insertion": arm(None)}}
    lines = headline(res).splitlines()
    assert any(line.split() == ["infused", "75%", "of", "4", "documents;", "56%", "of", "9", "words"] for line in lines)
    assert not any(line.strip().startswith("insertion") and "documents" in line for line in lines)
    assert lines[-1] == "verdict"
