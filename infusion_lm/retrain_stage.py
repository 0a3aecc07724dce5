"""The retrain stage's work: every arm retrained once per seed from the clean checkpoint, observed on every
evaluation set, each (arm, seed) written as it finishes so an interrupted run resumes where it stopped."""

from __future__ import annotations

from typing import Dict

from .atomic_io import read_json, write_json
from .distributed import is_main
from .fingerprints import fingerprint


# What an observation holds; bump it when that changes, so a cached (arm, seed) observed the old way is retrained
# rather than compared with new ones. 2: the measurement set observed with the measurement's own f (f_pairwise beside).
OBSERVATIONS_SCHEMA = 2


def unit_fingerprint(pipe, arm: str, seed: int) -> str:
    """The fingerprint of one (arm, seed): the retrain stage's, without the lists of arms and seeds. Each arm trains
    alone from the same checkpoint, so adding an arm or a seed to a finished run trains only what is new. Control
    trains on the clean corpus: its unit needs the clean checkpoint (the ``control`` key), not the edits, so a new
    edit retrains the edited arms and reads control back."""
    from .stages import fingerprint_key

    key = fingerprint_key(pipe, "retrain")
    section = {k: v for k, v in (key["settings"].get("retrain") or {}).items() if k not in ("arms", "seeds")}
    settings = {**key["settings"], "retrain": section}
    if "+" not in arm:  # the defence's own settings (the modality's defence_settings) move only the defended arms
        settings = {k: v for k, v in settings.items() if k not in getattr(pipe.modality, "defence_settings", ())}
    key = {**key, "settings": settings, "arm": arm, "seed": seed, "observations_schema": OBSERVATIONS_SCHEMA}
    if arm == "control":
        key["needs"] = {"control": pipe.stage_fingerprint("control")}
    return fingerprint(key)


def finished(record: dict, unit: str, stage: str) -> bool:
    """A unit's record is current: its own fingerprint matches, or (a record written before units had one) the
    stage's does, which pins the same arms and seeds."""
    return record.get("unit_fingerprint", None) == unit or (
        "unit_fingerprint" not in record and record.get("fingerprint") == stage)


def retrain_every_arm(pipe) -> None:
    """Retrains ``retrain.arms`` × the seeds; writes ``retrain/<arm>/seed-<s>.json``, ``observations.json`` per arm
    and the retrain summary. Within a seed every arm starts from the same checkpoint, seed and data order."""
    from .retrain import load_checkpoint_model, save_weights, train_arm, weights_fingerprint

    t, out = pipe.recipe.retrain, pipe.folder
    indices = read_json(pipe.folder.selection)["indices"]
    device = str(next(pipe.model.parameters()).device)
    sets = pipe.observed_sets()
    theta = {name: pipe.observe(pipe.model, name) for name in sets}
    summary = {"theta_hat": {name: o["f_mean"] for name, o in theta.items()},
               **pipe.modality.theta_hat_summary(theta)}
    ckpt = pipe.arm_checkpoint()
    fp = pipe.stage_fingerprint("retrain")
    per_arm: Dict[str, Dict[str, dict]] = {arm: {} for arm in t.arms}
    # Seeds in the outer loop: an interrupted run has whole seeds (every arm) to compare.
    for seed in pipe.seeds:
        for arm in t.arms:
            path, unit = out.arm_seed(arm, seed), unit_fingerprint(pipe, arm, seed)
            if not pipe.force and path.is_file() and finished(read_json(path), unit, fp):
                per_arm[arm][str(seed)] = read_json(path)
                continue  # this arm and seed finished before (an interrupted run, or one with fewer arms or seeds)
            edited_arm, _, defence = arm.partition("+")  # `<arm>+<defence>`: retrained on what the defence keeps
            replacements = pipe.modality.replacements(edited_arm, indices)
            shared = (out.shared_control(pipe.stage_fingerprint('control'), seed)
                      if arm == "control" and t.share_control and not t.lora else None)
            if shared is not None and not pipe.force and (shared / "fingerprint.json").is_file():
                model, trainer = load_checkpoint_model(pipe.arm_model(), shared), None
            else:
                rows = pipe.arm_rows(replacements)
                if defence:
                    rows, defended = pipe.modality.defended_rows(rows, defence, arm)
                model, trainer = train_arm(pipe.arm_model, pipe.trainer_collator, rows, t,
                                           out.arm(arm) / "trainer", seed, device, pipe.progress, ckpt)
                if shared is not None and is_main():
                    save_weights(model, shared)
                    write_json(shared / "fingerprint.json", {"fingerprint": pipe.stage_fingerprint("control"), "seed": seed})
            record = {"fingerprint": fp, "unit_fingerprint": unit, "arm": arm, "seed": seed,
                      "replaced": sorted(int(i) for i in replacements),
                      "weights": weights_fingerprint(model), "checkpoint": str(ckpt) if ckpt else None,
                      **({"defence": defended} if defence else {}),
                      **{name: pipe.observe(model, name) for name in sets}}
            if t.save_models:
                save_weights(model, out.arm(arm) / f"model-seed{seed}")
            if is_main():
                write_json(path, record)
            per_arm[arm][str(seed)] = record
            del model, trainer
    for arm, by_seed in per_arm.items():
        first = by_seed[str(pipe.seeds[0])]
        # The first seed's observations stay at the top level (what a single-seed reader expects); every
        # seed's are under per_seed.
        record = {"fingerprint": fp, "arm": arm, "replaced": first["replaced"], "seeds": pipe.seeds,
                  **({"defence": first["defence"]} if "defence" in first else {}),
                  "weights": first["weights"], "checkpoint": first["checkpoint"],
                  "summary": {name: sum(by_seed[str(s)][name]["f_mean"] for s in pipe.seeds) / len(pipe.seeds)
                              for name in sets},
                  **{name: first[name] for name in sets},
                  "per_seed": {str(s): {k: by_seed[str(s)][k] for k in ("weights", *sets)} for s in pipe.seeds}}
        if is_main():
            write_json(out.observations(arm), record)
        summary[arm] = record["summary"]
    if is_main():
        write_json(out.retrain_summary, summary)

