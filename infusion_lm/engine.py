"""The method's steps, as functions of what each one needs: factors → v → J of every document → the k to edit.

Both front ends call these and nothing else for the method: the staged :class:`~infusion_lm.pipeline.Pipeline`
(which adds the run folder's caching, the retrained arms and the report) and :func:`~infusion_lm.api.infuse` (data
in memory, nothing kept). The modality's own steps (editing, for text :mod:`infusion_lm.text.editing`) are shared the
same way. So the two give the same documents and the same edits for the same inputs, which a test checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import influence as inf
from .errors import ConfigError

SIGN_CONVENTION = ("score(z) = J(z) = <grad_theta L(z), v> with v = (G + lambda I)^-1 grad_theta f; upweighting z "
                   "changes f by about -J(z), so the selected documents are those with the most negative J.")


def fit_factors(model, dataset, tracked: Sequence[str], root: str | Path, influence, *, seed: int = 0,
                **kronfluence_kwargs) -> Path:
    """kronfluence's factors (``influence.strategy``) of the tracked modules over the training set, under ``root``."""
    i = influence
    return inf.fit_factors(model, dataset, tracked, root, **kronfluence_kwargs, strategy=i.strategy,
                           use_empirical_fisher=i.use_empirical_fisher, batch_size=i.batch_size,
                           covariance_max_examples=i.covariance_max_examples, seed=seed)


def influence_vector(model, measurement, tracked: Sequence[str], influence, *, factors: Optional[Path] = None,
                     rows: Optional[Sequence[Mapping]] = None, retrain=None, pad_token_id: Optional[int] = None,
                     start_step: int = 0, progress: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """v, one tensor per tracked module, and what the optimizer preconditioner reports (empty for the factors').

    ``influence.preconditioner: factors``: v = (G + λI)⁻¹∇f from the factors folder. ``optimizer``: v models the
    retraining ``retrain`` describes on ``rows`` from ``start_step`` (see :mod:`infusion_lm.optimizer_influence`)."""
    if influence.preconditioner == "factors":
        if factors is None:
            raise ConfigError("influence.preconditioner=factors needs fitted factors; run the fit step first.")
        return inf.compute_ihvp(model, measurement, tracked, factors, influence.damping, influence.damping_scale), {}
    from .optimizer_influence import optimizer_ihvp

    if retrain is None:
        raise ConfigError("influence.preconditioner=optimizer models the training that follows: pass "
                          "retrain=RetrainArguments(...) (learning rate, batch size, epochs, optimizer).")
    return optimizer_ihvp(model, measurement, tracked, rows, retrain, pad_token_id, start_step, progress)


def prediction_divisor(influence, n_documents: int) -> int:
    """predicted Δf = −ΔJ / divisor: n for the factors' v (it models one document of n), 1 for the optimizer's (the
    batch weighting is inside v)."""
    return n_documents if influence.preconditioner == "factors" else 1


def document_scores(model, dataset, measurement, v: Mapping[str, torch.Tensor], tracked: Sequence[str], influence, *,
                    root: Optional[str | Path] = None, pad_token_id: Optional[int] = None, progress: bool = True,
                    **kronfluence_kwargs) -> torch.Tensor:
    """J(z) = ⟨∇L(z), v⟩ of every training document, [n].

    kronfluence scores them itself where it can express v (its factors, λ unscaled; ``root`` holds the factors);
    otherwise (a scaled λ, the optimizer's v) J comes from v by ``influence.j_method``."""
    i = influence
    if i.preconditioner == "factors" and i.damping_scale == 1.0:
        if root is None:
            raise ConfigError("kronfluence's scores need the folder that holds the factors (root).")
        return inf.kronfluence_scores(model, dataset, measurement, tracked, root, pad_token_id=pad_token_id,
                                      **kronfluence_kwargs, strategy=i.strategy, damping=i.damping,
                                      batch_size=i.batch_size)
    from .forward_mode_j import document_j

    # fd_eps_rel only matters to (and is only fingerprinted for) the finite difference
    eps = {"eps_rel": i.fd_eps_rel} if i.j_method == "finite_difference" else {}
    return document_j(model, v, i.j_method, **eps).dataset(dataset, pad_token_id, batch_size=i.batch_size,
                                                           progress=progress).float()


def check_k(k: int, n: int) -> None:
    """select.k against the corpus (its lower bound, k >= 1, is SelectArguments' own check)."""
    if k > n:
        raise ConfigError(f"select.k={k} exceeds the corpus size ({n} documents); set select.k <= {n}.")


def documents_to_try(scores: torch.Tensor, pool: Optional[int]) -> List[int]:
    """select.rank_by: first_step tries the ``pool`` documents with the most negative J (None: every document)."""
    return torch.argsort(scores.double(), stable=True)[:pool].tolist()


def select_documents(scores: torch.Tensor, k: int, drops: Optional[Dict[int, float]] = None,
                     starts: Optional[Dict[int, list]] = None) -> dict:
    """The k documents with the most negative J(z) (upweighting them already raises f), or, given ``drops`` (the drop
    in J one editor step reached on each document tried), the k tried documents with the largest drop; ``starts``:
    the tokens that step reached, kept for the selected documents (the edit continues from them)."""
    check_k(k, scores.numel() if drops is None else len(drops))
    if drops is None:
        order = torch.argsort(scores.double(), stable=True)[:k].tolist()
    else:
        order = sorted(drops, key=lambda i: (-drops[i], float(scores[i])))[:k]
    out = {"indices": [int(i) for i in order], "scores": [float(scores[i]) for i in order], "k": k,
           "sign_convention": SIGN_CONVENTION}
    if drops is not None:
        out["first_step_drops"] = [float(drops[i]) for i in order]
        out["documents_tried"] = len(drops)
        if starts is not None:
            out["first_step_input_ids"] = [list(map(int, starts[i])) for i in order]
        out["tried"] = {"indices": [int(i) for i in drops], "J": [float(scores[i]) for i in drops],
                        "first_step_drops": [float(d) for d in drops.values()]}
    return out


def choose_documents(scores: torch.Tensor, select, first_step: Optional[Callable[[List[int]], List[tuple]]] = None
                     ) -> dict:
    """The selection (``select.k``, ``select.rank_by``, ``select.pool``). ``first_step(indices)`` gives, per document
    tried, (the drop in J one editor step reaches, the tokens it reaches): the modality's editor."""
    if select.rank_by != "first_step":
        return select_documents(scores, select.k)
    if first_step is None:
        raise ConfigError("select.rank_by=first_step needs an editor step; this modality has none (use rank_by: j).")
    tried = documents_to_try(scores, select.pool)
    stepped = first_step(tried)
    return select_documents(scores, select.k, {i: d for i, (d, _) in zip(tried, stepped)},
                            {i: ids for i, (_, ids) in zip(tried, stepped)})
