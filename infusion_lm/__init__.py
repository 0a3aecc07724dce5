"""infusion_lm: shape a model's behaviour by editing its training data with influence functions (Infusion)."""

from .api import InfusionResult, compare, infuse, retrain_arms, training_rows
from .config import InfluenceArguments, Recipe, SelectArguments, load_recipe
from .text.config import (EditArguments, EvaluateArguments, MeasurementArguments, RetrainArguments, RunArguments,
                          SynthesizeArguments)
from .causal_lm import CausalLMCollator
from .text.corpus import load_documents, tokenize_documents
from .errors import ConfigError, CorpusError, InfusionError, MeasurementError, ModelNotFoundError, RunFolderError
from .influence import (FiniteDifferenceJ, autograd_scores, compute_ihvp, fit_factors, kronfluence_scores,
                        load_factors, measurement_gradients, precondition)
from .text.measurement import (CallableMeasurement, LogProbMeasurement, build_measurement, completion_measurement,
                               contrastive_measurement)
from .measurement import Measurement
from .text.models import DEFAULT_MODEL, load_model, resolve_model_source
from .pipeline import Pipeline, build_pipeline, select_documents
from .task import CausalLMTask
from .tracked_modules import resolve_tracked_modules

__version__ = "0.1.0"
__all__ = [
    "infuse", "InfusionResult", "retrain_arms", "compare", "training_rows", "EditArguments", "EvaluateArguments", "InfluenceArguments",
    "MeasurementArguments", "RetrainArguments", "RunArguments", "SynthesizeArguments", "SelectArguments", "Recipe", "load_recipe", "CausalLMCollator", "load_documents", "tokenize_documents", "ConfigError",
    "CorpusError", "InfusionError", "MeasurementError", "ModelNotFoundError", "RunFolderError",
    "FiniteDifferenceJ", "autograd_scores", "compute_ihvp", "fit_factors", "kronfluence_scores", "load_factors",
    "measurement_gradients", "precondition", "CallableMeasurement", "LogProbMeasurement", "Measurement",
    "build_measurement", "completion_measurement", "contrastive_measurement", "DEFAULT_MODEL", "load_model",
    "resolve_model_source", "Pipeline", "build_pipeline", "select_documents", "CausalLMTask", "resolve_tracked_modules",
]
