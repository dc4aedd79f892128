"""Resolution of "auto" and explicit hyperparameters, and the errors users see."""

from __future__ import annotations

import pytest

from app.errors import InvalidRequest
from app.jobs.spec import TrainingSpec, auto_batch_size, auto_eval_every, auto_n_epochs, resolve_spec
from app.ml.registry import PRETRAINED_DEFAULTS, TINY_DEFAULTS


def test_auto_epochs_give_small_datasets_enough_passes_and_cap_large_ones():
    assert auto_n_epochs(10, 100) == 10
    assert auto_n_epochs(100, 100) == 3
    assert auto_n_epochs(20_000, 100) == 1
    assert auto_n_epochs(2, 1000) == 50  # capped at the API's maximum


def test_auto_batch_size_grows_with_the_dataset_within_the_models_cap():
    assert auto_batch_size(10, 32) == 1
    assert auto_batch_size(160, 32) == 8
    assert auto_batch_size(100_000, 32) == 32


def test_auto_eval_every_keeps_sample_evaluations_cheap_and_at_most_about_twenty():
    assert auto_eval_every(total_steps=60, batch_size=8) == 80  # 640 examples trained per 32 evaluated
    assert auto_eval_every(total_steps=60, batch_size=64) == 10
    assert auto_eval_every(total_steps=10_000, batch_size=64) == 500  # 20 evaluations
    spec = resolve_spec({"batch_size": 8, "early_stopping": {"patience": 2}}, 160, TINY_DEFAULTS, seed=1)
    assert spec.eval_every == 80 and spec.early_stopping == {"patience": 2, "min_delta": 0.0}
    assert TrainingSpec.from_dict(spec.to_dict()) == spec


def test_all_auto_resolves_from_the_base_models_defaults():
    spec = resolve_spec({"n_epochs": "auto", "batch_size": "auto"}, 160, TINY_DEFAULTS, seed=7)
    assert spec.learning_rate == TINY_DEFAULTS.learning_rate and spec.learning_rate_multiplier == 1.0
    assert (spec.n_epochs, spec.batch_size, spec.seed) == (6, 8, 7)
    assert spec.auto == ["n_epochs", "batch_size", "learning_rate_multiplier"]
    assert spec.target_modules == "all-linear"
    assert TrainingSpec.from_dict(spec.to_dict()) == spec


def test_explicit_values_and_multiplier_scale_the_default_learning_rate():
    spec = resolve_spec(
        {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "r": 8, "alpha": 16, "use_rslora": True},
        50,
        PRETRAINED_DEFAULTS,
        seed=None,
    )
    assert spec.learning_rate == pytest.approx(PRETRAINED_DEFAULTS.learning_rate * 0.5)
    assert (spec.n_epochs, spec.batch_size, spec.lora_r, spec.lora_alpha, spec.use_rslora) == (2, 4, 8, 16, True)
    assert spec.auto == [] and spec.seed == 42


@pytest.mark.parametrize(
    ("hp", "param"),
    [
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"n_epochs": 51}, "hyperparameters.n_epochs"),
        ({"n_epochs": 1.5}, "hyperparameters.n_epochs"),
        ({"batch_size": 257}, "hyperparameters.batch_size"),
        ({"batch_size": True}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": 0}, "hyperparameters.learning_rate_multiplier"),
        ({"learning_rate_multiplier": "fast"}, "hyperparameters.learning_rate_multiplier"),
        ({"lora_dropout": 1.5}, "hyperparameters.lora_dropout"),
        ({"target_modules": []}, "hyperparameters.target_modules"),
        ({"max_seq_length": 4}, "hyperparameters.max_seq_length"),
        ({"long_example_policy": "truncate_right"}, "hyperparameters.long_example_policy"),
        ({"beta": 0.1}, "hyperparameters.beta"),
        ({"eval_every": 0}, "hyperparameters.eval_every"),
        ({"early_stopping": {"min_delta": 0.1}}, "early_stopping"),
        ({"early_stopping": {"patience": 2, "delta": 0.1}}, "early_stopping"),
        ({"early_stopping": 3}, "early_stopping"),
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience"),
        ({"early_stopping": {"patience": 1.5}}, "early_stopping.patience"),
        ({"early_stopping": {"patience": 2, "min_delta": -1}}, "early_stopping.min_delta"),
    ],
)
def test_out_of_range_values_name_the_parameter(hp, param):
    with pytest.raises(InvalidRequest) as info:
        resolve_spec(hp, 100, PRETRAINED_DEFAULTS, seed=1)
    assert info.value.param == param


def test_seed_out_of_range_is_rejected():
    with pytest.raises(InvalidRequest) as info:
        resolve_spec({}, 100, PRETRAINED_DEFAULTS, seed=-1)
    assert info.value.param == "seed"


def test_a_checkpoint_of_an_older_spec_continues_when_only_measurement_or_new_defaults_differ():
    spec = resolve_spec({"n_epochs": 2, "batch_size": 4}, 100, TINY_DEFAULTS, seed=1)
    older = {k: v for k, v in spec.to_dict().items() if k != "early_stopping"} | {"eval_every": 10}
    assert spec.continues(older) and spec.continues(spec.to_dict())
    assert not spec.continues(older | {"batch_size": 8})
    stopping = resolve_spec(
        {"n_epochs": 2, "batch_size": 4, "early_stopping": {"patience": 2}}, 100, TINY_DEFAULTS, seed=1
    )
    assert not stopping.continues(older)  # early stopping changes where training ends
