import pytest

from heart_lib import config
from heart_lib.config import ConfigError


def test_every_profile_validates_every_notebook():
    profiles = config.available_profiles()
    assert {"smoke", "default", "full", "paper"} <= set(profiles)
    for profile in profiles:
        for notebook in config.profile_notebooks(profile):
            config.load_params(profile, notebook)


def test_unknown_profile_names_the_available_ones():
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*default"):
        config.profile_notebooks("nope")


@pytest.mark.parametrize("values, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": "32"}, "batch_size.*integer"),
    ({"limit": -5}, "limit"),
    ({"model": "vit_bass_patch16_224"}, "unknown model.*vit_base_patch16_224"),
    ({"dataset": "imagenet-21k"}, "dataset.*allowed"),
    ({"bacth_size": 32}, "unknown parameter.*bacth_size"),
    ({"seed": 1.5}, "seed.*integer"),
    ({"model_kwargs": [1]}, "model_kwargs.*mapping"),
])
def test_bad_parameters_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        config.validate("baseline", values)


def test_types_are_coerced_where_harmless():
    params = config.validate("baseline", {"limit": None, "model_kwargs": {"img_size": 32}})
    assert params.limit is None and params.model_kwargs == {"img_size": 32}


def test_notebook_params_ignore_non_parameters():
    params = config.notebook_params("baseline", {"profile": "x", "batch_size": 8, "__name__": "m"})
    assert params.batch_size == 8


def test_unknown_notebook():
    with pytest.raises(ConfigError, match="unknown notebook"):
        config.validate("nonsense", {})
