"""Re-state the committed results' intervals with the library's current methods.

An interval is a dict with ``ci`` and ``per_seed``. Two kinds:

- **With the per-item differences** (``per_seed_item``, written by ``stats.seed_item_interval``): recomputed by
  ``seed_item_interval`` itself, so the interval follows the library's current method (seeds and items both
  resampled: valid for new text of the kind evaluated). The interval it replaces is kept as ``ci_before_restate``
  the first time.
- **Without them** (results committed before ``seed_item_interval``, which kept only the per-seed means; their
  two-level bootstrap drew items independently within each resampled seed and was too narrow): a t-interval over
  the per-seed means, S − 1 degrees of freedom, **conditional on these positions**. It measures how retraining
  seeds move Δf on these very evaluation items, not how Δf would vary over new text, so it is no interval for new
  positions, and it is narrower than one that is where items vary a lot. Each gets ``ci_scope`` saying so and keeps
  the old interval as ``ci_old_two_level_bootstrap``; the file gets a top-level ``ci_method`` and ``ci_scope``.

Every file gets ``ci_restated`` (counts). Idempotent: a second run recomputes the same intervals and keeps the
first old ones.

    python evals/restate_intervals.py [files...]      # default: every evals/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infusion_lm.stats import seed_item_interval, seed_t_interval  # noqa: E402

SCOPE = ("conditional on these positions: retraining-seed noise on these evaluation items only (the per-item "
         "differences were not kept), not an interval for new text")
METHOD = ("seed_t_from_per_seed_means: mean ± t_(S-1) · sd(seed means)/√S, recomputed from the committed per-seed "
          "means; " + SCOPE + "; the old two-level bootstrap CI is kept as ci_old_two_level_bootstrap")


def same(a, b) -> bool:  # a recomputed interval equal but for float rounding is left as committed
    return a == b or (a is not None and b is not None and np.allclose(a, b, rtol=1e-12, atol=1e-15))


def excludes_0(ci) -> bool:
    return bool(ci and (ci[0] > 0 or ci[1] < 0))


def restate(node, counts):
    if isinstance(node, dict):
        seeds = node.get("per_seed")
        if "ci" in node and isinstance(seeds, list):
            if "per_seed_item" in node:  # the items are here: the interval over seeds and items, as a rerun gives
                kind, old_key = "seed_item", "ci_before_restate"
                new = seed_item_interval(np.array(node["per_seed_item"], float), 0.95)
                if same(new["ci"], node["ci"]):
                    new["ci"] = node["ci"]
                else:
                    node.setdefault(old_key, node["ci"])
                node.update({k: new[k] for k in ("ci", "ci_method", "df", "p_greater", "seed_noise") if k in new})
            else:
                kind, old_key = "seed_only", "ci_old_two_level_bootstrap"
                node.setdefault(old_key, node["ci"])
                new = seed_t_interval(seeds, 0.95) if len(seeds) >= 2 else None
                node["ci"] = node["ci"] if same(new, node["ci"]) else new
                node["ci_scope"] = "conditional on these positions"  # the file's ci_scope says what that means
            c = counts.setdefault(kind, {"intervals": 0, "changed": 0, "old_excludes_0": 0, "new_excludes_0": 0})
            old = node.get(old_key, node["ci"])
            c["intervals"] += 1
            c["changed"] += not same(old, node["ci"])
            c["old_excludes_0"] += excludes_0(old)
            c["new_excludes_0"] += excludes_0(node["ci"])
        for v in node.values():
            restate(v, counts)
    elif isinstance(node, list):
        for v in node:
            restate(v, counts)


def main(files):
    files = [Path(f) for f in files] or sorted((ROOT / "evals" / "results").glob("*.json"))
    print(f"{'file':<48}{'kind':>10}{'intervals':>10}{'changed':>9}{'old excl. 0':>13}{'new excl. 0':>13}")
    for f in files:
        raw = f.read_text()
        data, before = json.loads(raw), json.loads(raw)
        if not isinstance(data, dict):
            continue
        counts = {}
        restate(data, counts)
        if not counts:
            continue
        top = {"ci_restated": counts}
        if "seed_only" in counts:
            top = {"ci_method": METHOD, "ci_scope": SCOPE, **top}
        data = {**top, **{k: v for k, v in data.items() if k not in top}}
        if data != before:  # written as it was laid out (indent, final newline), so the diff is the change
            indent = len(raw.splitlines()[1]) - len(raw.splitlines()[1].lstrip()) if "\n" in raw else None
            f.write_text(json.dumps(data, indent=indent) + ("\n" if raw.endswith("\n") else ""))
        for kind, c in counts.items():
            print(f"{f.name:<48}{kind:>10}{c['intervals']:>10}{c['changed']:>9}{c['old_excludes_0']:>13}"
                  f"{c['new_excludes_0']:>13}")


if __name__ == "__main__":
    main(sys.argv[1:])
