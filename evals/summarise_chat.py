"""Summary of finished chat-preference units: python evals/summarise_chat.py DIR [--out DIR/summary.json]

DIR holds one observation file per arm and seed, ``<arm>_seed-<N>.json`` (the pipeline's
``retrain/<arm>/seed-<N>.json``, copied as each unit finished). Per arm: the sampled and greedy rates at which the
held-out answers name the target and the mean exact log p of the target answer, per seed; and, for each arm against
control on the seeds both have, the paired Δ of the sampled rate with the seed × question interval
(``infusion_lm.stats.seed_item_interval``: questions resampled as whole columns, seeds with a t quantile).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from infusion_lm.stats import seed_item_interval


def load(folder: Path) -> dict:
    units = {}
    for f in sorted(folder.glob("*_seed-*.json")):
        m = re.fullmatch(r"(.+)_seed-(\d+)\.json", f.name)
        if m:
            units.setdefault(m.group(1), {})[int(m.group(2))] = json.loads(f.read_text())["heldout"]
    return units


def summarise(units: dict, confidence: float = 0.95) -> dict:
    out = {"arms": {}, "against_control": {}}
    for arm, seeds in units.items():
        out["arms"][arm] = {str(s): {"sampled_rate": float(np.mean(h["sampled_hit_rate"])),
                                     "greedy_rate": float(np.mean(h["greedy_hit"])),
                                     "mean_logp_target_answer": float(np.mean(h["f"]))}
                            for s, h in sorted(seeds.items())}
    control = units.get("control", {})
    for arm, seeds in units.items():
        common = sorted(set(seeds) & set(control))
        if arm == "control" or not common:
            continue
        d = np.array([np.subtract(seeds[s]["sampled_hit_rate"], control[s]["sampled_hit_rate"]) for s in common])
        dl = np.array([np.subtract(seeds[s]["f"], control[s]["f"]) for s in common])
        out["against_control"][arm] = {"seeds": common, "sampled_rate_delta": seed_item_interval(d, confidence),
                                       "logp_target_delta": seed_item_interval(dl, confidence)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    folder = Path(args.folder)
    s = summarise(load(folder))
    print(f"{'arm':<14}{'seeds':>8}{'Δ sampled rate':>16}{'CI':>20}{'Δ log p(target)':>18}")
    for arm, r in s["against_control"].items():
        d, dl = r["sampled_rate_delta"], r["logp_target_delta"]
        ci = d.get("ci") or [float("nan")] * 2
        print(f"{arm:<14}{','.join(map(str, r['seeds'])):>8}{d['mean']:>+16.4f}   [{ci[0]:+.4f}, {ci[1]:+.4f}]"
              f"{dl['mean']:>+18.3f}")
    out = Path(args.out) if args.out else folder / "summary_seeds.json"
    out.write_text(json.dumps(s, indent=1) + "\n")
    print(f"wrote {out}")
    return s


if __name__ == "__main__":
    main()
