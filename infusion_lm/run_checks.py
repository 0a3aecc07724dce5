"""Everything a run checks before it writes anything: the run folder belongs to this recipe, the modality's data,
model and measurement load, the tracked modules resolve, factors on disk come from this model, and k fits the
corpus. A bad recipe fails here with one line, and nothing is lost."""

from __future__ import annotations

from . import influence as inf
from .atomic_io import read_json
from .engine import check_k
from .errors import ConfigError, RunFolderError
from .stages import reaches


def check_run_folder(pipe, keys=("model", "corpus")) -> None:
    """output_dir must be a folder, and one that no other recipe (another model or corpus) has written to."""
    r = pipe.recipe.run
    if pipe.dir.exists() and not pipe.dir.is_dir():
        raise ConfigError(f"output_dir {pipe.dir} is a file; point output_dir at a folder.")
    cfg_path = pipe.folder.config
    if cfg_path.is_file() and not pipe.force:
        import yaml

        try:
            old = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            old = {}
        for key in keys:
            if key in old and old[key] != getattr(r, key):
                raise RunFolderError(f"Run folder {pipe.dir} belongs to a different recipe ({key}: {old[key]!r}, "
                                     f"not {getattr(r, key)!r}); choose another output_dir or pass --force.")


def validate(pipe, upto: str = "evaluate") -> None:
    """Checks everything that can be checked before writing: run folder identity, the modality's data, model and
    measurement, tracked modules, factors already on disk, and k against the corpus size."""
    check_run_folder(pipe, ("model", "corpus") + (("modality",) if pipe.modality.name != "text" else ()))
    pipe.modality.validate(upto)
    if reaches(upto, "fit"):
        _ = pipe.tracked
        check_factor_fingerprint(pipe)
    if reaches(upto, "measure"):
        _ = pipe.measurement
        if not pipe.force and pipe.is_current("fit") and not (pipe.is_current("measure") and pipe.is_current("score")):
            inf.load_factors(pipe.factors_dir)  # corrupted files: say so now
    if reaches(upto, "select"):
        check_k(pipe.recipe.select.k, pipe.modality.corpus_size())  # now, before anything is written


def check_factor_fingerprint(pipe) -> None:
    """Factors already in the run folder must come from this very model (weights included)."""
    fp_path = pipe.factors_dir / "infusion_fingerprint.json"
    if pipe.force or not fp_path.is_file() or pipe.at_checkpoint:  # checkpoint factors: keyed by its fingerprint
        return
    recorded = read_json(fp_path)
    if recorded.get("tracked_modules") != pipe.tracked:
        return  # a different tracking choice is a legitimate config change: the fit stage refits
    current = inf.model_fingerprint(pipe.model, pipe.tracked)
    if recorded.get("model") != current:
        raise RunFolderError(f"Factors in {fp_path.parent} were fitted on a different model (fingerprint "
                             f"{recorded.get('model')} != {current}); use a new output_dir, or pass --force to refit.")
