"""evals/device_check.sh in its CPU small mode (the tiny test model): every step runs and exits 0, and summary.json
under $OUT lists them with their seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_small_mode_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SIZE": "small", "OUT": str(out), "WORK": str(tmp_path / "work"),
           "PYTHON_BIN": sys.executable, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "evals" / "device_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + json.dumps(summary, indent=1)
    names = [s["name"] for s in summary["steps"]]
    assert names == ["environment", "tiny_model", "pytest", "recipe", "bench_scale"]
    assert summary["size"] == "small" and summary["ok"] is True
    for s in summary["steps"]:
        if s.get("skipped"):
            assert s["reason"]
            continue
        assert s["exit_status"] == 0, s
        assert s["seconds"] > 0
        assert (out / s["log"]).is_file()
    assert summary["environment"]["torch"]
    assert json.loads((out / "bench_scale.json").read_text())["documents"]["values"] == [12]
    assert (out / "recipe_results.json").is_file()
