"""Training documents: loading, and tokenisation with the same masking fine-tuning uses.

Every consumer (factor fitting, scoring, the editor, the Trainer) sees documents through :func:`tokenize_documents`
and collates them with :class:`~infusion_lm.causal_lm.CausalLMCollator`, so the loss that influence is computed for
is exactly the loss that training minimises.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from ..causal_lm import IGNORE_INDEX
from ..errors import CorpusError

logger = logging.getLogger(__name__)



def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"Corpus {path} is not UTF-8 (invalid byte at offset {err.start}); re-encode it as UTF-8, "
                          f"e.g. `iconv -f latin1 -t utf-8`.") from None


def _doc_from_record(rec: Any, text_field: str, messages_field: str, where: str) -> Dict[str, Any]:
    if not isinstance(rec, dict):
        raise CorpusError(f"{where}: expected a JSON object with `{text_field}` or `{messages_field}`.")
    if messages_field in rec and rec[messages_field] is not None:
        msgs = rec[messages_field]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise CorpusError(f"{where}: `{messages_field}` must be a list of {{role, content}} objects.")
        if msgs and not any(m["role"] == "assistant" for m in msgs):
            raise CorpusError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained; "
                              f"add the assistant's answer or remove the row.")
        return {"messages": msgs}
    if text_field in rec and isinstance(rec[text_field], str):
        return {"text": rec[text_field]}
    raise CorpusError(f"{where}: no `{text_field}` text field (keys: {sorted(rec)}); set text_field in the recipe.")


def load_documents(
    path: str,
    text_field: str = "text",
    messages_field: str = "messages",
    separator: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Loads documents as dicts with either ``text`` or ``messages``.

    Accepts a ``datasets`` folder written by ``save_to_disk``, JSONL (one object per line), or plain text (one document
    per line, or split on ``separator``). Empty documents are dropped with a warning; an empty corpus is an error.
    """
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"Corpus {p} does not exist; set `corpus` to a datasets folder, a .jsonl or a .txt file.")
    docs: List[Dict[str, Any]] = []
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as err:  # noqa: BLE001
            raise CorpusError(f"Corpus folder {p} is not a `datasets` folder written by save_to_disk ({err}).") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise CorpusError(f"Corpus {p} is a DatasetDict without a `train` split (splits: {list(ds)}).")
            ds = ds["train"]
        for i, rec in enumerate(ds):
            docs.append(_doc_from_record(rec, text_field, messages_field, f"{p} row {i}"))
    elif p.suffix in {".jsonl", ".json"}:
        for lineno, line in enumerate(_read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{p} line {lineno} is not valid JSON ({err.msg}); JSONL needs one object per line.") from None
            docs.append(_doc_from_record(rec, text_field, messages_field, f"{p} line {lineno}"))
    else:
        text = _read_utf8(p)
        pieces = text.split(separator) if separator else text.splitlines()
        docs = [{"text": s.strip()} for s in pieces]
    n_before = len(docs)
    docs = [d for d in docs if ("messages" in d and d["messages"]) or ("text" in d and d["text"].strip())]
    if len(docs) < n_before:
        logger.warning("Dropped %d empty documents from %s.", n_before - len(docs), p)
    if not docs:
        raise CorpusError(f"Corpus {p} holds no documents; it is empty or every document is blank.")
    return docs


def _assistant_char_spans(tokenizer, messages: Sequence[Dict[str, str]]) -> tuple[str, List[tuple[int, int]]]:
    """Renders a conversation and finds the character spans of assistant turns (the only trained tokens).

    Rendering prefixes incrementally works for any chat template that renders a conversation as the concatenation
    of its turns, which is what `apply_chat_template` assumes for generation prompts anyway.
    """
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise CorpusError("The tokenizer's chat template does not render conversations turn by turn; "
                              "pass plain-text documents instead.")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_document(tokenizer, doc: Dict[str, Any], max_length: int, add_eos: bool = True) -> Dict[str, Any]:
    if "messages" in doc:
        text, spans = _assistant_char_spans(tokenizer, doc["messages"])
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [
            tok if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE_INDEX
            for tok, (a, b) in zip(ids, enc["offset_mapping"])
        ]
    else:
        ids = tokenizer(doc["text"], add_special_tokens=True)["input_ids"]
        if add_eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        labels = list(ids)
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def tokenize_documents(tokenizer, docs: Sequence[Dict[str, Any]], max_length: int, add_eos: bool = True,
                       long_documents: str = "truncate"):
    """Returns a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (prompt tokens masked with -100).

    Documents longer than ``max_length`` are truncated with a warning, or, with ``long_documents="fail"``, refused.
    """
    import datasets

    rows = [tokenize_document(tokenizer, d, max_length, add_eos) for d in docs]
    long = [i for i, r in enumerate(rows) if r["truncated"]]
    if long and long_documents == "fail":
        raise CorpusError(f"{len(long)} documents are longer than max_length={max_length} tokens (e.g. {long[:10]}); "
                          f"raise max_length, shorten them, or set long_documents: truncate.")
    n_trunc = sum(r.pop("truncated") for r in rows)
    if n_trunc:
        logger.warning("Truncated %d of %d documents to max_length=%d tokens.", n_trunc, len(rows), max_length)
    empty = [i for i, r in enumerate(rows) if sum(l != IGNORE_INDEX for l in r["labels"][1:]) == 0]
    if empty:
        raise CorpusError(f"Documents {empty[:10]} have no trained tokens after tokenisation (too short, or all "
                          f"prompt); remove them or raise max_length.")
    return datasets.Dataset.from_list(rows)
