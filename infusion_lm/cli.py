"""Command line: ``infusion-lm {synthesize,fit,measure,score,edit,run} RECIPE.yaml [section.key=value ...]``.

Overrides use dotted keys and YAML values, e.g. ``select.k=4 influence.strategy=kfac influence.layers=[0,3]``.
Each command runs the stages it needs; stages whose outputs are already in output_dir for the same upstream
configuration are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from .errors import InfusionError

RUN_HELP = "run every stage, from the corpus to the report"


def _commands() -> dict:
    """command -> (the stage it runs up to, help), from the stage table, plus ``run``."""
    from .stages import BY_NAME, COMMANDS

    out = {cmd: (stage, BY_NAME[cmd].help + ("; then " + BY_NAME[stage].help if cmd != stage else ""))
           for cmd, stage in COMMANDS.items()}
    out["run"] = ("evaluate", RUN_HELP)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infusion-lm", description="Influence-guided training-data editing (Infusion).",
                                epilog="Overrides: section.key=value, e.g. select.k=4 influence.damping=1e-3")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in _commands().items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("recipe", help="YAML recipe (see recipes/)")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides")
        sp.add_argument("--force", action="store_true", help="recompute every stage and accept a run folder made by another recipe")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--dry-run", action="store_true",
                        help="print the resolved plan and an estimate of its cost; run nothing, write nothing")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also come after --flags
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet = args.quiet or not sys.stderr.isatty()
    import warnings

    # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated in torch 2.14: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated", category=FutureWarning)
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would print into logs
    try:
        from .config import load_recipe
        from .distributed import init_if_launched
        from .pipeline import build_pipeline

        init_if_launched()

        recipe = load_recipe(args.recipe, args.overrides)
        pipe = build_pipeline(recipe, progress=not quiet, force=args.force)
        upto = _commands()[args.command][0]
        if upto == "synthesize" and not pipe.synthetic:
            raise InfusionError("`synthesize` needs `corpus: synthetic` in the recipe (it writes output_dir/corpus.jsonl).")
        if args.dry_run:
            from .dry_run import format_plan, plan

            print(format_plan(plan(pipe)))
            return 0
        result = pipe.run(upto)
    except InfusionError as err:
        print(f"infusion-lm: error: {err}", file=sys.stderr)
        return 2
    from .distributed import is_main

    if not is_main():
        return 0  # rank 0 reports for everyone
    print(pipe.timing_summary(), file=sys.stderr)
    if upto == "select":
        print(json.dumps({k: result[k] for k in ("k", "indices", "scores")}))
    if upto == "edit":
        for r in result:
            print(json.dumps({k: r[k] for k in ("doc_index", "n_changed", "J_before", "J_after", "predicted_delta_f",
                                                 "perplexity_before", "perplexity_after")}))
    print(f"outputs in {pipe.dir}", file=sys.stderr)
    if upto == "evaluate" and getattr(pipe.recipe.run, "modality", "text") == "text":
        from .evaluation import headline

        print(headline(result))
        print(f"report: {pipe.folder.report_html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
