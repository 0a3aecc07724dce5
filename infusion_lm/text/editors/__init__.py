"""Token editors that lower J(z) of the selected documents: ``swap`` (default), ``natural`` (whole-word swaps that
fit both sides), ``simplex_pgd`` and ``random``."""

from .base import EditResult, TokenEditor, allowed_vocabulary, effective_embeddings, retokenises
from .random import FluentTargetEditor, RandomEditor, RandomTargetEditor
from .simplex_pgd import SimplexPGDEditor, gini_entropy, project_entropy, project_simplex
from .natural import NaturalEditor, NaturalTargetEditor
from .swap import SwapEditor

EDITORS = {"swap": SwapEditor, "natural": NaturalEditor, "simplex_pgd": SimplexPGDEditor, "random": RandomEditor,
           "random_target": RandomTargetEditor, "fluent_target": FluentTargetEditor,
           "natural_target": NaturalTargetEditor}


def build_editor(model, tokenizer, v, args, eps_rel: float = 1e-4, target_words=()) -> TokenEditor:
    """The editor named by ``args.editor`` (an :class:`~infusion_lm.config.EditArguments`). ``target_words``: the
    measurement's words, allowed at every editable position unless ``args.target_words`` says otherwise."""
    if args.editor not in EDITORS:
        from ...errors import ConfigError

        raise ConfigError(f"edit.editor {args.editor!r} is not a token editor; use one of {', '.join(EDITORS)}.")
    return EDITORS[args.editor](model, tokenizer, v, args, eps_rel=eps_rel, target_words=target_words)


def first_step(model, tokenizer, v, args, rows, eps_rel: float = 1e-4, target_words=(), progress: bool = False):
    """One step of the swap editor (``args``' budget, fluency and limits) on each row, as EditResults: their drop
    J(z) − J(z') is what ``select.rank_by: first_step`` ranks documents by, and the edit continues from them."""
    import dataclasses

    editor = build_editor(model, tokenizer, v, dataclasses.replace(args, editor="swap", steps=1), eps_rel, target_words)
    return editor.edit_many(rows, progress=progress)


__all__ = ["EDITORS", "EditResult", "FluentTargetEditor", "NaturalEditor", "NaturalTargetEditor", "RandomEditor", "RandomTargetEditor", "SimplexPGDEditor", "SwapEditor", "TokenEditor",
           "allowed_vocabulary", "build_editor", "effective_embeddings", "first_step", "gini_entropy", "project_entropy",
           "project_simplex", "retokenises"]
