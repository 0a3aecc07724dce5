"""evals/bench_scale.py end to end on the tiny model: two sizes, one length, in a subprocess; the JSON has every stage
with its seconds and exponent, the plot is written, and a second run reads the finished sizes back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["fit", "measure", "score", "select", "edit"]


def _bench(tmp_path, model_dir):
    out = tmp_path / "results" / "bench_scale.json"
    cmd = [sys.executable, str(ROOT / "evals" / "bench_scale.py"), "--model", str(model_dir), "--layers", "1",
           "--sizes", "12", "24", "--tokens", "32", "--lengths", "32", "--length_docs", "12",
           "--work_dir", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_bench_scale_on_two_tiny_sizes(tmp_path, tiny_model_dir):
    out, stdout = _bench(tmp_path, tiny_model_dir)
    result = json.loads(out.read_text())
    assert result["command"].startswith("python evals/bench_scale.py")
    docs = result["documents"]
    assert docs["values"] == [12, 24]
    for stage in STAGES:
        row = docs["stages"][stage]
        assert set(row["seconds"]) == {"12", "24"} and all(s >= 0 for s in row["seconds"].values())
        assert isinstance(row["exponent"], float)
        assert set(row["peak_rss_mb"]) == {"12", "24"} and all(m > 0 for m in row["peak_rss_mb"].values())
        assert isinstance(row["linear_or_better"], bool)
    for ranking in ("select+edit (j)", "select+edit (first_step, pool 3k)", "select+edit (first_step, every document)"):
        assert isinstance(docs["stages"][ranking]["exponent"], float)
    # the first_step rankings tried what they say: pool = 3k (k = the recipe's 4), then every document
    big = result["points"]["n24_t32"]
    assert big["rankings"]["first_step_pool"]["documents_tried"] == 12
    assert big["rankings"]["first_step_all"]["documents_tried"] == 24
    assert big["corpus"]["real_tinystories"] + big["corpus"]["templated"] == 24
    assert (Path(big["corpus"]["path"])).is_file()
    assert result["lengths"]["values"] == [32]  # the length sweep's one point is the sizes sweep's n=12
    assert all(isinstance(v, bool) for v in result["goals"].values())
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "fit" in stdout and "exp" in stdout

    # resumable: a second run reads both sizes back instead of rerunning them
    _, stdout = _bench(tmp_path, tiny_model_dir)
    assert stdout.count("(read back)") == 2
