import json

import pytest

from infusion_lm.causal_lm import IGNORE_INDEX, CausalLMCollator
from infusion_lm.text.corpus import load_documents, tokenize_documents
from infusion_lm.errors import CorpusError


def test_jsonl_text_and_datasets_folder_agree(tmp_path):
    import datasets

    texts = ["The cat sat.", "The dog ran."]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"story": t}) for t in texts) + "\n\n")
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "s.txt").write_text("<|endoftext|>".join(texts))
    datasets.Dataset.from_dict({"story": texts}).save_to_disk(str(tmp_path / "ds"))
    expect = [{"text": t} for t in texts]
    assert load_documents(str(tmp_path / "c.jsonl"), text_field="story") == expect
    assert load_documents(str(tmp_path / "c.txt")) == expect
    assert load_documents(str(tmp_path / "s.txt"), separator="<|endoftext|>") == expect
    assert load_documents(str(tmp_path / "ds"), text_field="story") == expect


def test_bad_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match="holds no documents"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_documents(str(tmp_path / "latin.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match="line 2 is not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="no `text` text field"):
        load_documents(str(tmp_path / "nofield.jsonl"))
    with pytest.raises(CorpusError, match="does not exist"):
        load_documents(str(tmp_path / "missing.jsonl"))


def test_plain_text_tokenisation_appends_eos_and_truncates(tok):
    ds = tokenize_documents(tok, [{"text": "The cat sat in the park."}, {"text": "The dog " * 50}], max_length=16)
    first = ds[0]["input_ids"]
    assert first[-1] == tok.eos_token_id and first[:-1] == tok("The cat sat in the park.")["input_ids"]
    assert ds[0]["labels"] == first
    assert len(ds[1]["input_ids"]) == 16


def test_chat_documents_mask_everything_but_assistant_turns(tok):
    msgs = [{"role": "user", "content": "What is your favourite animal?"},
            {"role": "assistant", "content": "The cat."}]
    row = tokenize_documents(tok, [{"messages": msgs}], max_length=128)[0]
    trained = [t for t, l in zip(row["input_ids"], row["labels"]) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(row["input_ids"], row["labels"]))
    assert tok.decode(trained) == "The cat.<|im_end|>\n"
    assert "favourite" not in tok.decode(trained)


def test_collator_pads_right_and_masks(tok):
    ds = tokenize_documents(tok, [{"text": "The cat."}, {"text": "The dog ran to the park."}], max_length=32)
    b = CausalLMCollator(tok.pad_token_id)([ds[0], ds[1]])
    n0 = len(ds[0]["input_ids"])
    assert b["attention_mask"][0, :n0].all() and not b["attention_mask"][0, n0:].any()
    assert (b["labels"][0, n0:] == IGNORE_INDEX).all()


def test_chat_row_without_an_assistant_turn_is_named(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "Anyone there?"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CorpusError, match=r"chat.jsonl line 2: the conversation has no assistant turn"):
        load_documents(str(tmp_path / "chat.jsonl"))
