"""``--dry-run``: the resolved plan of a recipe and an estimate of its cost, without loading the model's weights.

The stages come from the stage table, in order, each marked cached or to run; the cost of each comes from the
modality's ``dry_run_costs`` (text: token-passes from the corpus's real token counts; images: image-passes), with a
rate measured on 2 CPU cores. A GPU is far faster.
"""

from __future__ import annotations

from typing import Dict, List


def stage_costs(pipe, cost: Dict[str, float], seconds_per_pass: float) -> List[Dict]:
    """One row per stage of the stage table that runs for this recipe, in order: cached or not, and its cost."""
    from .stages import TABLE

    rows = []
    for st in TABLE:
        if not st.step or not st.runs_when(pipe):
            continue
        cached = pipe.dir.is_dir() and pipe.is_current(st.name) and not pipe.force
        rows.append({"stage": st.name, "cached": cached, "token_passes": 0 if cached else int(cost[st.name]),
                     "est_seconds": 0.0 if cached else cost[st.name] * seconds_per_pass})
    return rows


def plan(pipe) -> Dict:
    """The plan of a pipeline's recipe: what it trains on, the stages with their cost, and the totals."""
    rec = pipe.recipe
    est = pipe.modality.dry_run_costs(pipe)
    stages = stage_costs(pipe, est["cost"], est["seconds_per_pass"])
    return {"model": rec.run.model, "source": est.get("source", rec.run.corpus), "documents": est["documents"],
            "tokens": est["tokens"], "k": rec.select.k, "editor": rec.edit.editor, "arms": list(rec.retrain.arms),
            "output_dir": str(pipe.dir), "stages": stages, "unit": est.get("unit", "token-passes"),
            "total_token_passes": sum(s["token_passes"] for s in stages),
            "total_est_seconds": sum(s["est_seconds"] for s in stages)}


def format_plan(p: Dict) -> str:
    unit = p.get("unit", "token-passes")
    what = "pixel values" if unit == "image-passes" else "tokens"
    lines = [f"model {p['model']} ({p['source']})",
             f"corpus {p['documents']} documents, {p['tokens']} {what}; edit k={p['k']} with {p['editor']}; "
             f"arms {', '.join(p['arms'])}; output {p['output_dir']}", "",
             f"{'stage':<12}{'status':>10}{unit:>16}{'est. time (2 CPU cores)':>26}"]
    for s in p["stages"]:
        status = "cached" if s["cached"] else "to run"
        lines.append(f"{s['stage']:<12}{status:>10}{s['token_passes']:>16,}{s['est_seconds'] / 60:>22.1f} min")
    lines.append(f"{'total':<12}{'':>10}{p['total_token_passes']:>16,}{p['total_est_seconds'] / 60:>22.1f} min")
    return "\n".join(lines)
