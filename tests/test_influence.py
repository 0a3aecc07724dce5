"""The influence engine against independent computations: kronfluence's own scores, a brute-force solve,
autograd, and retraining."""

import copy

import pytest
import torch

from infusion_lm import influence as inf
from infusion_lm.causal_lm import CausalLMCollator, per_document_loss


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_ihvp_reproduces_kronfluence_pairwise_scores(tiny_setup, tiny_factors, strategy):
    s = tiny_setup
    root, dirs = tiny_factors
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], dirs[strategy], damping=None)
    ours = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    theirs = inf.kronfluence_scores(s["model"], s["dataset"], s["measurement"], s["tracked"], root,
                                    pad_token_id=s["tok"].pad_token_id, strategy=strategy, damping=None,
                                    scores_name=f"check_{strategy}")
    assert ours.shape == (len(s["dataset"]),)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-3, atol=1e-3 * float(ours.abs().max()))


@pytest.mark.slow
def test_ihvp_with_fixed_damping_also_matches(tiny_setup, tiny_factors):
    s = tiny_setup
    root, dirs = tiny_factors
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], dirs["ekfac"], damping=1e-3)
    ours = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    theirs = inf.kronfluence_scores(s["model"], s["dataset"], s["measurement"], s["tracked"], root,
                                    pad_token_id=s["tok"].pad_token_id, strategy="ekfac", damping=1e-3,
                                    scores_name="check_damped")
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-3, atol=1e-3 * float(ours.abs().max()))


def _per_sample_grads(model, dataset, name, pad_id):
    collate = CausalLMCollator(pad_id)
    w, b = inf.module_params(model, name)
    w.requires_grad_(True)
    rows = []
    for i in range(len(dataset)):
        loss = per_document_loss(model, collate([dataset[i]])).sum()
        (g,) = torch.autograd.grad(loss, [w])
        rows.append(g.reshape(-1).double())
    w.requires_grad_(False)
    return torch.stack(rows)


@pytest.mark.slow
def test_diagonal_ihvp_matches_brute_force_solve(tiny_setup, tmp_path):
    """With the empirical Fisher and the diagonal strategy, kronfluence's G is exactly diag((1/n) Σ g gᵀ)."""
    s = tiny_setup
    model = copy.deepcopy(s["model"])
    name = "model.layers.1.mlp.down_proj"
    damping = 1e-4
    d = inf.fit_factors(model, s["dataset"], [name], tmp_path, pad_token_id=s["tok"].pad_token_id,
                        strategy="diagonal", use_empirical_fisher=True, batch_size=8)
    v = inf.compute_ihvp(model, s["measurement"], [name], d, damping=damping)[name].double()

    grads = _per_sample_grads(model, s["dataset"], name, s["tok"].pad_token_id)  # [n, P]
    gauss_newton = grads.T @ grads / grads.shape[0]  # the full P×P empirical Fisher, formed explicitly
    damped_diag = torch.diag(torch.diag(gauss_newton)) + damping * torch.eye(gauss_newton.shape[0], dtype=torch.float64)
    grad_f = inf.measurement_gradients(model, s["measurement"], [name])[name].reshape(-1).double()
    brute = torch.linalg.solve(damped_diag, grad_f).reshape(v.shape)
    torch.testing.assert_close(v, brute, rtol=1e-4, atol=1e-6 * float(brute.abs().max()))


def test_finite_difference_J_matches_autograd(tiny_setup, tiny_factors):
    s = tiny_setup
    _, dirs = tiny_factors
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], dirs["ekfac"], damping=None)
    exact = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    before = {k: p.clone() for k, p in s["model"].state_dict().items()}
    # fp32: the tiny random model is nearly linear, so rounding (∝ 1/ε) dominates and a larger step is better here.
    fd = inf.FiniteDifferenceJ(s["model"], v, eps_rel=1e-3).dataset(s["dataset"], s["tok"].pad_token_id)
    rel = float((fd - exact).abs().max() / exact.abs().max())
    assert rel <= 1e-2, rel
    # The forward-only evaluation must leave the model untouched.
    for k, p in s["model"].state_dict().items():
        assert torch.equal(p, before[k]), k


def test_J_of_one_v_does_not_depend_on_the_order_of_its_modules(tiny_setup, tiny_factors):
    """v held in memory follows the model's module order, v read back from safetensors is sorted by name: the two must
    give the same ε and the same J to the bit, or two front ends on one v edit differently."""
    s = tiny_setup
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], tiny_factors[1]["ekfac"], damping=None)
    reordered = dict(reversed(list(v.items())))
    assert list(reordered) != list(v)
    assert inf.fd_epsilon(s["model"], v) == inf.fd_epsilon(s["model"], reordered)
    batch = CausalLMCollator(s["tok"].pad_token_id)([s["dataset"][i] for i in range(6)])
    with torch.no_grad():
        assert torch.equal(inf.FiniteDifferenceJ(s["model"], v)(batch), inf.FiniteDifferenceJ(s["model"], reordered)(batch))


def test_fingerprint_rejects_factors_from_another_model(tiny_setup, tiny_factors):
    s = tiny_setup
    other = copy.deepcopy(s["model"])
    with torch.no_grad():
        other.get_submodule(s["tracked"][0]).weight.add_(1e-3)
    with pytest.raises(inf.RunFolderError, match="different model"):
        inf.load_factors(tiny_factors[1]["ekfac"], other, s["tracked"])


@pytest.mark.slow
def test_kronfluence_stages_leave_the_model_as_it_was(tiny_setup, tiny_factors):
    s = tiny_setup
    model = s["model"]
    flags = [p.requires_grad for p in model.parameters()]
    types = {n: type(m) for n, m in model.named_modules()}
    batch = CausalLMCollator(s["tok"].pad_token_id)([s["dataset"][0]])
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    inf.kronfluence_scores(model, s["dataset"], s["measurement"], s["tracked"], tiny_factors[0],
                           pad_token_id=s["tok"].pad_token_id, scores_name="untouched")
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert [p.requires_grad for p in model.parameters()] == flags
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)


@pytest.mark.slow
def test_lora_adapters_ihvp_and_J_match_kronfluence_and_autograd(tiny_setup, tmp_path):
    """On a peft model the default tracked modules are the LoRA A/B projections; v over them reproduces kronfluence's
    own pairwise scores, and the forward-only J matches autograd."""
    from peft import LoraConfig, get_peft_model

    from infusion_lm.tracked_modules import resolve_tracked_modules

    s = tiny_setup
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(s["model"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                  lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every gradient through A zero: a trained adapter instead
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    tracked = resolve_tracked_modules(model)
    assert tracked and all(".lora_A." in n or ".lora_B." in n for n in tracked)
    pad = s["tok"].pad_token_id
    factors = inf.fit_factors(model, s["dataset"], tracked, tmp_path, pad_token_id=pad, strategy="ekfac", batch_size=8)
    v = inf.compute_ihvp(model, s["measurement"], tracked, factors, damping=None)
    ours = inf.autograd_scores(model, s["dataset"], v, pad_token_id=pad)
    theirs = inf.kronfluence_scores(model, s["dataset"], s["measurement"], tracked, tmp_path, pad_token_id=pad,
                                    strategy="ekfac", damping=None, scores_name="lora")
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-3, atol=1e-3 * float(ours.abs().max()))
    fd = inf.FiniteDifferenceJ(model, v, eps_rel=1e-3).dataset(s["dataset"], pad)
    assert float((fd - ours).abs().max() / ours.abs().max()) <= 1e-2


def test_forward_mode_J_equals_autograd_and_leaves_the_model_alone(tiny_setup, tiny_factors):
    """The JVP is the exact directional derivative: per-document autograd to fp32 rounding, far tighter than the finite
    difference; also on a bf16 model (evaluated on an fp32 copy); attention implementation and weights restored."""
    from infusion_lm.forward_mode_j import ForwardModeJ

    s = tiny_setup
    _, dirs = tiny_factors
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], dirs["ekfac"], damping=None)
    exact = inf.autograd_scores(s["model"], s["dataset"], v, pad_token_id=s["tok"].pad_token_id)
    before = {k: p.clone() for k, p in s["model"].state_dict().items()}
    impl = s["model"].config._attn_implementation
    J = ForwardModeJ(s["model"], v)
    fm = J.dataset(s["dataset"], s["tok"].pad_token_id, batch_size=3)
    assert float((fm - exact).abs().max() / exact.abs().max()) <= 1e-4
    # The loss it returns beside J is the model's own summed loss at θ̂.
    rows = [s["dataset"][i] for i in range(4)]
    batch = CausalLMCollator(s["tok"].pad_token_id)(rows)
    j, loss = J.with_loss(batch)
    torch.testing.assert_close(loss, per_document_loss(s["model"], batch), rtol=1e-5, atol=1e-5)
    # Variants of one document (the editor's call) agree with scoring them as a batch.
    ids = torch.stack([torch.tensor(r["input_ids"]) for r in rows if len(r["input_ids"]) == len(rows[0]["input_ids"])])
    labels = ids.clone()
    torch.testing.assert_close(J.variants(ids[0], labels[0], ids, labels, batch_size=2).float(),
                               J({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}))
    assert s["model"].config._attn_implementation == impl
    for k, p in s["model"].state_dict().items():
        assert torch.equal(p, before[k]), k
    half = copy.deepcopy(s["model"]).to(torch.bfloat16)
    hb = ForwardModeJ(half, v).dataset(rows, s["tok"].pad_token_id)
    assert next(half.parameters()).dtype == torch.bfloat16  # the caller's model is left alone
    ref = inf.autograd_scores(half.float(), rows, v, pad_token_id=s["tok"].pad_token_id)
    assert float((hb - ref).abs().max() / ref.abs().max()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("damping_scale", [1.0, 10.0])
def test_score_stage_is_J_of_the_saved_ihvp(tmp_path, tiny_model_dir, tok, damping_scale):
    """measure → score is one computation: whichever way the score stage computes J (kronfluence's own scores at
    damping_scale 1, J along ihvp.safetensors otherwise), scores.safetensors is <∇L(z), v> for the v that measure
    saved, by autograd."""
    from transformers import AutoModelForCausalLM

    from infusion_lm.cli import main
    from infusion_lm.text.corpus import tokenize_documents
    from infusion_lm.atomic_io import read_tensors
    from tiny import write_corpus as _write_corpus, write_recipe as _recipe
    from tiny import toy_corpus

    corpus = _write_corpus(tmp_path / "c.jsonl", toy_corpus(12))
    recipe = _recipe(tmp_path, tiny_model_dir, corpus, influence={"damping_scale": damping_scale})
    assert main(["score", str(recipe), "--quiet"]) == 0
    run = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = list(tokenize_documents(tok, [{"text": t} for t in toy_corpus(12)], 48))
    ref = inf.autograd_scores(model, rows, read_tensors(run / "ihvp.safetensors"), pad_token_id=tok.pad_token_id)
    scores = read_tensors(run / "scores.safetensors")["scores"].double()
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(scores, ref, rtol=1e-3, atol=2e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("method", ["forward_mode", "finite_difference"])
def test_J_is_computed_in_eval_mode_whatever_mode_the_model_is_in(tiny_setup, tiny_factors, method):
    """A user's model in train mode with dropout 0.5 gives the same J as in eval mode, and is left in train mode."""
    from infusion_lm.forward_mode_j import document_j

    s = tiny_setup
    _, dirs = tiny_factors
    v = inf.compute_ihvp(s["model"], s["measurement"], s["tracked"], dirs["ekfac"], damping=None)
    model = copy.deepcopy(s["model"])
    model.config.attention_dropout = 0.5
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    rows = [s["dataset"][i] for i in range(4)]
    batch = CausalLMCollator(s["tok"].pad_token_id)(rows)
    model.eval()
    ref = document_j(model, v, method, eps_rel=1e-3)(batch)
    model.train()
    torch.manual_seed(0)
    got = document_j(model, v, method, eps_rel=1e-3)(batch)
    torch.testing.assert_close(got, ref)
    assert all(m.training for m in model.modules())
