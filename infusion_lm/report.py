"""report.md and report.html from results.json: a summary table, plots, and token-level diffs of the edited documents.

The HTML is a single self-contained file (plots embedded as base64 PNG, no CDN, no scripts), readable offline.
Token diffs follow the paper's figure: removed tokens struck through, new ones in bold.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Dict, List

from .run_folder import RunFolder
from .atomic_io import atomic_path


def format_number(x, digits: int = 3) -> str:
    """A number for a report table: – for None, yes/no for booleans, small and large values in e-notation."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def format_ci(d: Dict) -> str:
    """'mean [low, high]', or the mean alone when there is no CI."""
    ci = d.get("ci")
    mean = format_number(d["mean"])
    return f"{mean} [{format_number(ci[0])}, {format_number(ci[1])}]" if ci else mean


def summary_rows(results: Dict) -> List[List[str]]:
    rows = []
    primary = results.get("primary_set", "heldout")
    for arm, e in results["arms"].items():
        m, h = e["measurement"], e.get(primary, e["measurement"])
        edits = e.get("edits", {})
        det = e.get("detectors", {})
        spec = h.get("specificity", {}).get("target_specific_gain")
        rows.append([
            arm, format_ci(m["delta_f"]), format_ci(e["heldout"]["delta_f"]) if "heldout" in e else "–",
            format_ci(e["heldout_corpus"]["delta_f"]) if "heldout_corpus" in e else "–",
            format_ci(spec) if spec else "–",
            format_number(h.get("top1_flips_to_target")), format_number(h.get("delta_target_rank"), 1),
            format_number(h.get("specificity", {}).get("p_greater")),
            f"{edits.get('tokens_changed', '–')}/{edits.get('budget', '–')}" if edits else "–",
            format_number(edits.get("perplexity_ratio_median")), format_number(edits.get("predicted_delta_f")),
            format_number(det.get("perplexity_auroc")), format_number(det.get("defender_influence_auroc")),
        ])
    return rows


HEADER = ["arm", "Δf (measurement) [CI]", "Δf (held-out templates) [CI]", "Δf (held-out real text) [CI]",
          "target-specific gain [CI]", "top-1 flips", "Δ target rank", "specificity p", "tokens changed",
          "ppl ratio (median)", "predicted Δf", "perplexity AUROC", "defender-influence AUROC"]


def seed_rows(results: Dict) -> List[List[str]]:
    """Per arm and evaluation set, Δf seed by seed."""
    rows = []
    for arm, e in results["arms"].items():
        for name in results.get("sets", ["measurement", "heldout"]):
            d = e.get(name, {}).get("delta_f", {})
            if d.get("per_seed"):
                rows.append([arm, name] + [f"{x:+.3f}" for x in d["per_seed"]])
    return rows


def notes(results: Dict) -> List[str]:
    """Plain sentences that belong under the table: the verdict, missing CIs, what each detector assumes."""
    out = []
    if results.get("verdict_sentence"):
        out.append(results["verdict_sentence"])
    no_ci = sorted({f"{arm}/{name}" for arm, e in results["arms"].items() for name in results.get("sets", [])
                    if name in e and e[name]["delta_f"].get("ci") is None})
    if no_ci:
        out.append(f"No CI for {', '.join(no_ci)}: a CI needs at least 2 items (or 2 seeds).")
    for name, text in (results.get("detector_assumptions") or {}).items():
        out.append(f"Detector `{name}`: {text}")
    return out


def token_diff(tokenizer, original: List[int], edited: List[int], markdown: bool) -> str:
    parts = []
    for a, b in zip(original, edited):
        if a == b:
            t = tokenizer.decode([a])
            parts.append(t if markdown else html.escape(t))
        else:
            old, new = tokenizer.decode([a]), tokenizer.decode([b])
            parts.append(f"~~{old}~~**{new}**" if markdown else f"<del>{html.escape(old)}</del><b>{html.escape(new)}</b>")
    return "".join(parts)


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plots(results: Dict, records: List[Dict]) -> Dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    arms = list(results["arms"])
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    present = [n for n in ("measurement", "heldout", "heldout_corpus") if arms and n in results["arms"][arms[0]]]
    for j, name in enumerate(present):
        offset = 0.0 if len(present) == 1 else -0.2 + 0.4 * j / (len(present) - 1)
        means = [results["arms"][a][name]["delta_f"]["mean"] for a in arms]
        cis = [results["arms"][a][name]["delta_f"]["ci"] or [m, m] for a, m in zip(arms, means)]
        err = [[m - c[0] for m, c in zip(means, cis)], [c[1] - m for m, c in zip(means, cis)]]
        ax.errorbar([i + offset for i in range(len(arms))], means, yerr=err, fmt="o", capsize=4, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("Δf against control")
    ax.legend()
    ax.set_title("Behaviour change per arm (seed × item t-interval)")
    out["delta_f.png"] = png_bytes(fig)
    plt.close(fig)

    pva = [(a, e["predicted_vs_actual"]) for a, e in results["arms"].items() if "predicted_vs_actual" in e]
    if pva:
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        for a, d in pva:
            ax.scatter(d["predicted_delta_f"], d["actual_delta_f"], label=a)
        lo = min(min(d["predicted_delta_f"], d["actual_delta_f"]) for _, d in pva)
        hi = max(max(d["predicted_delta_f"], d["actual_delta_f"]) for _, d in pva)
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("predicted Δf (sum over the edited documents)")
        ax.set_ylabel("actual Δf (measurement)")
        ax.legend()
        ax.set_title("Predicted against actual")
        out["predicted_vs_actual.png"] = png_bytes(fig)
        plt.close(fig)

    if records:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        for r in records:
            ax.plot(r["J_trace"], marker=".", label=f"doc {r['doc_index']}")
        ax.set_xlabel("editor step")
        ax.set_ylabel("J(z)")
        ax.set_title("J of each infused document during editing")
        if len(records) <= 10:
            ax.legend(fontsize=7)
        out["J_traces.png"] = png_bytes(fig)
        plt.close(fig)
    return out


def html_page(title: str, intro: str, header: List[str], rows: List[List[str]], images: Dict[str, bytes],
              body: List[str], results: Dict) -> List[str]:
    """A self-contained report page: summary table, embedded plots, ``body`` sections, then the full results."""
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px}"
           "del{color:#b00;text-decoration:line-through}b{color:#070}.doc{white-space:pre-wrap;background:#f7f7f7;"
           "padding:8px;border-radius:4px;font-family:monospace;font-size:13px}")
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style>"
         f"</head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", "<h2>Summary</h2><table><tr>"]
    h += [f"<th>{html.escape(c)}</th>" for c in header] + ["</tr>"]
    h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    h += ["</table>", "<h2>Plots</h2>"]
    h += [f"<p><img alt='{n}' src='data:image/png;base64,{base64.b64encode(d).decode()}'></p>" for n, d in images.items()]
    h += body
    h += ["<h2>Full results</h2>", f"<pre>{html.escape(json.dumps(results, indent=2))}</pre>", "</body></html>"]
    return h


def write_report(run_dir: Path, results: Dict, tokenizer) -> None:
    folder = RunFolder(run_dir)
    edits = folder.edits
    # Without an infused arm the folder's edits.jsonl (if any) belongs to another configuration: show none.
    records = ([json.loads(line) for line in edits.read_text(encoding="utf-8").splitlines()]
               if edits.is_file() and "infused" in results.get("arms", {}) else [])
    images = plots(results, records)
    folder.plots.mkdir(exist_ok=True)
    for name, data in images.items():
        with atomic_path(folder.plots / name) as tmp:
            tmp.write_bytes(data)

    rows = summary_rows(results)
    seeds = results.get("seeds", [0])
    intro = (f"{results.get('verdict_sentence', '')} Measurement: {results['measurement']}. f at θ̂: "
             f"{format_number((results.get('theta_hat') or {}).get('measurement'))} (held-out "
             f"{format_number((results.get('theta_hat') or {}).get('heldout'))}); control after retraining: "
             f"{format_number(results['control']['measurement'])} (held-out {format_number(results['control'].get('heldout'))}). "
             f"{results['k']} of {results['n_documents']} documents edited. Every Δ is against control, paired by "
             f"retraining seed ({len(seeds)}: {seeds}) and by item; CIs are seed × item t-intervals"
             f"{' (one seed: they cover the items only, seed noise not measured)' if len(seeds) < 2 else ''}.")
    rates = results.get("theta_hat_target_rate")
    if rates:  # completion measurements: how often answers already name the target before any edit
        intro += " Target rate at θ̂: " + "; ".join(
            f"{name} " + ", ".join(f"{kind} {v:.1%}" for kind, v in r.items()) for name, r in rates.items()) + "."
    per_seed = seed_rows(results)
    seed_header = ["arm", "set"] + [f"Δf, seed {s}" for s in seeds]

    md = ["# Infusion report", "", intro, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes(results)]
    if per_seed:
        md += ["", "## Per seed", "", "| " + " | ".join(seed_header) + " |", "|" + "---|" * len(seed_header)]
        md += ["| " + " | ".join(r) + " |" for r in per_seed]
    md += ["", "## Plots", ""] + [f"![{n}](plots/{n})" for n in images]
    if records:
        md += ["", "## Edited documents (infused arm)", "", "Removed tokens ~~struck through~~, new ones in **bold**.", ""]
    for r in records:
        md += [f"### Document {r['doc_index']}: J {r['J_before']:.4g} → {r['J_after']:.4g}, "
               f"{r['n_changed']} tokens changed, perplexity {r['perplexity_before']:.3g} → {r['perplexity_after']:.3g}",
               "", token_diff(tokenizer, r["original_input_ids"], r["input_ids"], markdown=True).replace("\n", " "), ""]
    with atomic_path(folder.report_md) as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")

    body = ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes(results)) + "</ul>"]
    if per_seed:
        body += ["<h2>Per seed</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in seed_header) + "</tr>"]
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in per_seed]
        body += ["</table>"]
    if records:
        body += ["<h2>Edited documents (infused arm)</h2><p>Removed tokens <del>struck through</del>, new ones in "
                 "<b>bold</b>.</p>"]
    for r in records:
        body += [f"<h3>Document {r['doc_index']}: J {r['J_before']:.4g} → {r['J_after']:.4g}, {r['n_changed']} tokens "
                 f"changed, perplexity {r['perplexity_before']:.3g} → {r['perplexity_after']:.3g}</h3>",
                 f"<div class='doc'>{token_diff(tokenizer, r['original_input_ids'], r['input_ids'], markdown=False)}</div>"]
    h = html_page("Infusion report", intro, HEADER, rows, images, body, results)
    with atomic_path(folder.report_html) as tmp:
        tmp.write_text("\n".join(h), encoding="utf-8")
