"""The Experiment spec: its one schema, validation, typed views and the search space."""

from .space import Parameter, SearchSpace
from .spec import ExperimentSpec, load_spec
from .trial import Decision, Trial, TrialState
from .validation import Problem, SpecError, load_experiment

__all__ = [
    "Decision", "ExperimentSpec", "Parameter", "Problem", "SearchSpace", "SpecError", "Trial", "TrialState",
    "load_experiment", "load_spec",
]
