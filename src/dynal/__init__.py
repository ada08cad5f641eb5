"""dynal: deep active learning by leveraging training dynamics (dynamicAL) and its baselines."""

from dynal.data import Dataset, Split, from_arrays, load_arrays, load_dataset
from dynal.experiment import ExperimentConfig, run_experiment
from dynal.loop import ActiveLearner, LabelState, Query
from dynal.models import model_factory
from dynal.strategies import STRATEGIES, Strategy, make_strategy
from dynal.training import TrainConfig, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "ActiveLearner",
    "Dataset",
    "ExperimentConfig",
    "LabelState",
    "Query",
    "Split",
    "Strategy",
    "TrainConfig",
    "evaluate",
    "fit",
    "from_arrays",
    "load_arrays",
    "load_dataset",
    "make_strategy",
    "model_factory",
    "run_experiment",
]
