"""Are two run folders the same run? Every JSON, JSONL and safetensors file compared, ignoring timings and fingerprints.

Used to check that a refactor changed no number: run one recipe with the old and the new code into two folders, then

    python evals/compare_runs.py RUN_OLD RUN_NEW --out evals/results/refactor_identity.json

Fingerprints are skipped because they hash the whole config, so a new config field changes them without changing
any result. Exits 1 if any file differs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

IGNORED_KEYS = ("seconds", "elapsed", "wall_s", "started", "finished", "duration_s", "timestamp", "created",
                "fingerprint")


def _without_volatile(x, roots):
    if isinstance(x, dict):
        return {k: _without_volatile(v, roots) for k, v in x.items() if not any(s in k for s in IGNORED_KEYS)}
    if isinstance(x, list):
        return [_without_volatile(v, roots) for v in x]
    if isinstance(x, str):
        for root in roots:
            x = x.replace(root, "<run>")
    return x


def same_file(a: Path, b: Path, roots) -> bool | None:
    if a.suffix == ".safetensors":
        x, y = load_file(a), load_file(b)
        return x.keys() == y.keys() and all(x[k].shape == y[k].shape and (x[k] == y[k]).all() for k in x)
    if a.suffix == ".json":
        return _without_volatile(json.loads(a.read_text()), roots) == _without_volatile(json.loads(b.read_text()), roots)
    if a.suffix == ".jsonl":
        rows = lambda p: [_without_volatile(json.loads(line), roots) for line in p.read_text().splitlines() if line.strip()]
        return rows(a) == rows(b)
    return None  # other files (logs, html) are not compared


def compare(old: Path, new: Path) -> dict:
    roots = (str(old.resolve()), str(new.resolve()), str(old), str(new))
    files_old = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    files_new = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    identical, different = [], []
    for rel in sorted(files_old & files_new):
        verdict = same_file(old / rel, new / rel, roots)
        if verdict is not None:
            (identical if verdict else different).append(str(rel))
    return {"identical": len(identical), "different": different,
            "only_in_one": sorted(str(p) for p in files_old ^ files_new), "ignored_keys": list(IGNORED_KEYS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    result = compare(args.old, args.new)
    result["note"] = args.note
    print(f"identical {result['identical']}, different {len(result['different'])}, "
          f"only in one {len(result['only_in_one'])}")
    for rel in result["different"] + result["only_in_one"]:
        print("  ", rel)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(1 if result["different"] or result["only_in_one"] else 0)


if __name__ == "__main__":
    main()
