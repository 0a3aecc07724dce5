"""evals/bench_callback.py on the tiny model: each variant trains the same steps, InfusionCallback edits, the
MeasurementCallback logs at its interval, and the time inside the hooks is counted (InfusionCallback's includes the
infuse() it fires, which is reported apart)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_callback_on_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "bench_callback.json"
    cmd = [sys.executable, str(ROOT / "evals" / "bench_callback.py"), "--model", str(tiny_model_dir), "--docs", "8",
           "--steps", "4", "--k", "1", "--layers", "1", "--repeats", "2", "--threads", "1", "--note", "test",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["note"] == "test" and r["threads"] == 1
    for variant in ("plain", "infusion", "measurement"):
        assert [x["steps"] for x in r["runs"][variant]] == [4, 4]
    for x in r["runs"]["infusion"]:
        assert x["edited"] == 1 and x["fired_at"] == 2
        assert x["in_hooks_seconds"] >= x["infuse_seconds"] > 0  # the hooks contain the infuse() they fire
    assert all(x["measurements"] == 3 for x in r["runs"]["measurement"])  # at train begin, steps 2 and 4
    assert all(x["in_hooks_seconds"] > 0 for x in r["runs"]["measurement"])
    assert all(x["in_hooks_seconds"] == 0 for x in r["runs"]["plain"])
    s = r["summary"]
    assert len(s["measurement"]["in_hooks_per_repeat"]) == 2 and s["plain"]["run_to_run_spread"] >= 0
    assert set(r["goals"]) and all(isinstance(v, bool) for v in r["goals"].values())
