"""Re-state the committed results' intervals with the seed-level t-interval, where the per-item data are gone.

The results committed before ``stats.seed_item_interval`` carry a two-level bootstrap CI that drew items
independently within each resampled seed (too narrow: a null simulation excluded 0 in 20–33% of trials at a nominal
5%). Their per-item differences were not kept, only the per-seed means, so the interval that can be recomputed is a
t-interval over those seed means (S − 1 degrees of freedom). It leaves out the item variance every seed shares, so
it is still a lower bound on the honest width where items vary a lot; a rerun records ``seed_item_interval`` itself.

Each interval that has per-seed means gets ``ci`` replaced, the old one kept as ``ci_old_two_level_bootstrap``, and
the file a top-level ``ci_method``. Idempotent: a file already re-stated is left as it is.

    python evals/restate_intervals.py [files...]      # default: every evals/results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infusion_lm.stats import seed_t_interval  # noqa: E402

METHOD = ("seed_t_from_per_seed_means: mean ± t_(S-1) · sd(seed means)/√S, recomputed from the committed per-seed "
          "means (per-item differences were not kept; the item variance shared by the seeds is not included); "
          "the old two-level bootstrap CI is kept as ci_old_two_level_bootstrap")


def restate(node, counts):
    if isinstance(node, dict):
        seeds = node.get("per_seed")
        if "ci" in node and isinstance(seeds, list) and "ci_old_two_level_bootstrap" not in node:
            old = node["ci"]
            new = seed_t_interval(seeds, 0.95) if len(seeds) >= 2 else None
            node["ci_old_two_level_bootstrap"], node["ci"] = old, new
            counts["restated"] += 1
            counts["old_excludes_0"] += bool(old and (old[0] > 0 or old[1] < 0))
            counts["new_excludes_0"] += bool(new and (new[0] > 0 or new[1] < 0))
        for v in node.values():
            restate(v, counts)
    elif isinstance(node, list):
        for v in node:
            restate(v, counts)


def main(files):
    files = [Path(f) for f in files] or sorted((ROOT / "evals" / "results").glob("*.json"))
    print(f"{'file':<48}{'intervals':>10}{'old excl. 0':>13}{'new excl. 0':>13}")
    for f in files:
        data = json.loads(f.read_text())
        if "ci_method" in data:
            continue
        counts = {"restated": 0, "old_excludes_0": 0, "new_excludes_0": 0}
        restate(data, counts)
        if not counts["restated"]:
            continue
        data = {"ci_method": METHOD, "ci_restated": counts, **data}
        f.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{f.name:<48}{counts['restated']:>10}{counts['old_excludes_0']:>13}{counts['new_excludes_0']:>13}")


if __name__ == "__main__":
    main(sys.argv[1:])
