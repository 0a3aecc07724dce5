"""One engine behind both front ends: infuse() on rows in memory and `infusion-lm edit` on a recipe run the same
steps (engine.py, text/editing.py), so on the same model, corpus and settings they pick the same documents and write
the same tokens, for each scoring path (kronfluence's own scores; J from v with a scaled λ) and each ranking."""

import json

import pytest
import torch
import yaml

from infusion_lm import EditArguments, InfluenceArguments, MeasurementArguments, infuse
from infusion_lm.atomic_io import read_json, read_tensors
from infusion_lm.cli import main
from infusion_lm.text.models import load_model
from tiny import toy_corpus

DOCS = ["The dog ran to the park. The dog was happy.", "The dog sat in the garden."]


@pytest.mark.slow
@pytest.mark.parametrize("damping_scale,rank_by,contrast_top", [(1.0, "j", 0), (10.0, "first_step", 0),
                                                              (10.0, "first_step", None)])
def test_infuse_and_the_cli_edit_stage_agree(tmp_path, tiny_model_dir, damping_scale, rank_by, contrast_top):
    texts = toy_corpus(12)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    edit = {"budget_fraction": 0.15, "steps": 3, "n_candidates": 8}
    # The pairwise f (contrast_top 0) and the default f (the model's top alternatives). The last case once diverged:
    # v in memory and v read back from safetensors hold their modules in different orders, the fp32 norms behind ε
    # summed them in that order, and J of the same tokens differed by ~5e-7, enough to flip one close swap (J -7.97
    # against -6.24 after three). ε now sums in a fixed order, and J must agree to the bit.
    recipe = {"model": str(tiny_model_dir), "corpus": str(corpus), "max_length": 48, "output_dir": str(tmp_path / "run"),
              "measurement": {"kind": "contrastive", "probe": "dog", "target": "cat", "documents": DOCS,
                              **({} if contrast_top is None else {"contrast_top": contrast_top})},
              "influence": {"strategy": "ekfac", "layers": [1], "batch_size": 8, "damping_scale": damping_scale},
              "select": {"k": 3, "rank_by": rank_by, **({"pool": 6} if rank_by == "first_step" else {})},
              "edit": edit}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["edit", str(path), "--quiet"]) == 0
    cli_sel = read_json(tmp_path / "run" / "selection.json")["indices"]
    cli_edits = [json.loads(line) for line in (tmp_path / "run" / "edits.jsonl").read_text().splitlines()]

    model, tok = load_model(str(tiny_model_dir))
    r = infuse(model, tok, texts, MeasurementArguments(kind="contrastive", probe="dog", target="cat", documents=DOCS,
                                                    contrast_top=contrast_top),
               k=3, rank_by=rank_by, pool=6 if rank_by == "first_step" else None, max_length=48, progress=False,
               influence=InfluenceArguments(layers=[1], batch_size=8, damping_scale=damping_scale),
               edit=EditArguments(**edit))
    # the same scoring path, bit for bit (before one engine, infuse() took J from v where the CLI had kronfluence's)
    assert torch.equal(r.scores, read_tensors(tmp_path / "run" / "scores.safetensors")["scores"])
    assert r.indices == cli_sel
    assert [e["doc_index"] for e in cli_edits] == r.indices
    assert [row["input_ids"] for row in r.edited_rows] == [e["input_ids"] for e in cli_edits]
    assert any(e["n_changed"] > 0 for e in cli_edits)  # a comparison of unedited rows would prove nothing
    assert [rec["J_after"] for rec in r.records] == [e["J_after"] for e in cli_edits]  # to the bit
