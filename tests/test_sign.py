"""The sign convention, checked by actually retraining: documents with the most negative J raise f when upweighted."""

import pytest
import copy

import torch

from infusion_lm import influence as inf
from infusion_lm.causal_lm import CausalLMCollator, per_document_loss
from infusion_lm.text.corpus import tokenize_documents
from infusion_lm.text.measurement import contrastive_measurement
from infusion_lm.pipeline import select_documents
from infusion_lm.tracked_modules import resolve_tracked_modules
from tiny import tiny_model, toy_corpus, train_briefly


def _train_on(model, dataset, indices, pad_id, steps=10, lr=0.1):
    """Full-batch SGD on the given multiset of documents: deterministic, no data-order noise between arms."""
    model = copy.deepcopy(model)
    batch = CausalLMCollator(pad_id)([dataset[i] for i in indices])
    n_tokens = (batch["labels"][:, 1:] != -100).sum()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = per_document_loss(model, batch).sum() / n_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.mark.slow
def test_duplicating_selected_documents_raises_f_most(tok, tmp_path):
    k = 4
    wins_random, wins_opposite = 0, 0
    seeds = [0, 1, 2]
    for seed in seeds:
        dataset = tokenize_documents(tok, [{"text": t} for t in toy_corpus(32, seed=seed)], 64)
        model = train_briefly(tiny_model(len(tok), seed=seed), dataset, tok.pad_token_id, steps=60, seed=seed)
        measurement = contrastive_measurement(tok, ["The dog ran to the park.", "The dog sat in the house."], "dog", "cat")
        tracked = resolve_tracked_modules(model)
        fdir = inf.fit_factors(model, dataset, tracked, tmp_path / str(seed), pad_token_id=tok.pad_token_id,
                               strategy="ekfac", batch_size=8, seed=seed)
        v = inf.compute_ihvp(model, measurement, tracked, fdir, damping=None)
        scores = inf.autograd_scores(model, dataset, v, pad_token_id=tok.pad_token_id)

        selected = select_documents(scores, k)["indices"]
        opposite = torch.argsort(scores, descending=True)[:k].tolist()
        g = torch.Generator().manual_seed(seed)
        random_k = torch.randperm(len(dataset), generator=g)[:k].tolist()

        base = list(range(len(dataset)))  # the clean corpus, plus three extra copies of each arm's k documents
        f = {}
        for arm, extra in {"selected": selected, "random": random_k, "opposite": opposite}.items():
            f[arm] = measurement.value(_train_on(model, dataset, base + extra * 3, tok.pad_token_id))
        wins_random += f["selected"] > f["random"]
        wins_opposite += f["selected"] > f["opposite"]
    assert wins_opposite == len(seeds)
    assert wins_random == len(seeds)
