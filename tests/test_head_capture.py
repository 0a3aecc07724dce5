"""The finite-difference J without [B, T, V] logits: the output layer applied a few rows at a time gives the same J
and losses as the whole logits, and a model whose logits are not its output layer's keeps the plain path."""

import torch

from infusion_lm import finite_difference_j as fdj
from infusion_lm.causal_lm import CausalLMCollator


def _batch(s, n=6):
    return CausalLMCollator(s["tok"].pad_token_id)([s["dataset"][i] for i in range(n)])


def _v(s, scale=1e-2):
    g = torch.Generator().manual_seed(0)
    from infusion_lm.param_layout import module_params, to_layout

    out = {}
    for name in s["tracked"]:
        w, b = module_params(s["model"], name)
        out[name] = to_layout(torch.randn(w.shape, generator=g) * scale, None if b is None else torch.zeros_like(b))
    return out


def test_chunked_output_layer_gives_the_same_j_and_loss(tiny_setup, monkeypatch):
    s = tiny_setup
    batch, v = _batch(s), _v(s)
    J = fdj.FiniteDifferenceJ(s["model"], v, eps_rel=1e-3)
    assert J._head.usable
    monkeypatch.setattr(fdj, "LOGITS_MEMORY_BYTES", 1)  # one row per chunk: the most chunks there can be
    j_chunked, l_chunked = J.with_loss(batch)
    J._head.usable = False
    j_full, l_full = J.with_loss(batch)
    assert torch.allclose(l_chunked, l_full, rtol=1e-6)
    assert torch.allclose(j_chunked, j_full, rtol=1e-3, atol=1e-3 * float(j_full.abs().max()))
    # the per-variant path (prefix cache) too
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n = int(batch["attention_mask"][0].sum())
    ids, labels = ids[:n], labels[:n]
    variants = ids.repeat(4, 1)
    variants[torch.arange(4), torch.tensor([3, 5, 5, 8])] = torch.tensor([7, 9, 11, 13])
    J._head.usable = True
    jv, lv = J.variants_with_loss(ids, labels, variants, variants.clone())
    J._head.usable = False
    jv0, lv0 = J.variants_with_loss(ids, labels, variants, variants.clone())
    assert torch.allclose(lv, lv0, rtol=1e-6) and torch.allclose(jv, jv0, rtol=1e-3, atol=1e-3 * float(jv0.abs().max()))


def test_a_model_that_changes_its_logits_after_the_output_layer_keeps_the_plain_path(tiny_setup):
    model = tiny_setup["model"]

    class Scaled(torch.nn.Module):  # e.g. soft-capped or scaled logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = 2 * out.logits
            return out

    assert fdj.HeadCapture(model).usable
    assert not fdj.HeadCapture(Scaled(model)).usable
