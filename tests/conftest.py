import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub call hangs ~35 s; tests never need the hub
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import tiny_model, tiny_tokenizer, toy_corpus, train_briefly  # noqa: E402

MEASURE_DOCS = ["The dog ran to the park. The dog was happy.", "The dog sat in the garden."]


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_setup(tok):
    """A tiny Llama trained briefly on the toy corpus, its dataset, measurement and tracked modules."""
    from infusion_lm.text.corpus import tokenize_documents
    from infusion_lm.text.measurement import contrastive_measurement
    from infusion_lm.tracked_modules import resolve_tracked_modules

    torch.manual_seed(0)
    dataset = tokenize_documents(tok, [{"text": t} for t in toy_corpus(32)], 64)
    model = train_briefly(tiny_model(len(tok)), dataset, tok.pad_token_id, steps=60)
    measurement = contrastive_measurement(tok, MEASURE_DOCS, "dog", "cat")
    tracked = resolve_tracked_modules(model)
    return {"model": model, "dataset": dataset, "measurement": measurement, "tracked": tracked, "tok": tok}


@pytest.fixture(scope="session")
def tiny_factors(tiny_setup, tmp_path_factory):
    from infusion_lm.influence import fit_factors

    root = tmp_path_factory.mktemp("factors")
    s = tiny_setup
    out = {}
    for strategy in ("ekfac", "kfac"):
        out[strategy] = fit_factors(s["model"], s["dataset"], s["tracked"], root, pad_token_id=s["tok"].pad_token_id,
                                    strategy=strategy, batch_size=8)
    return root, out


@pytest.fixture(scope="session")
def tiny_model_dir(tok, tmp_path_factory):
    """A saved tiny model folder with its tokenizer, for CLI tests."""
    from infusion_lm.text.corpus import tokenize_documents

    d = tmp_path_factory.mktemp("tiny_model")
    dataset = tokenize_documents(tok, [{"text": t} for t in toy_corpus(32)], 64)
    model = train_briefly(tiny_model(len(tok)), dataset, tok.pad_token_id, steps=30)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
