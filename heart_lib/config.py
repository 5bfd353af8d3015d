"""Typed, validated notebook parameters and profiles.

A *profile* is a folder `notebooks/profiles/<profile>/` holding one YAML file per notebook
(`<notebook>.yaml`, the papermill parameters). Each notebook `<name>` has a parameter class
`heart_lib.experiments.<name>.Params`: a dataclass whose field types are checked here and whose
`check()` method (optional) validates values. A bad value fails before any compute, with a
message naming the notebook, the parameter, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from heart_lib.paths import PROJECT_ROOT, profiles_root

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
# Run order; the claims summary reads the others' results, so it comes last.
NOTEBOOK_ORDER = ("baseline", "sensitivity", "pruning", "finetune", "edge", "llm", "camphive", "hvp_toy", "claims")


class ConfigError(ValueError):
    """A parameter or profile is invalid; the message names it."""


def available_profiles() -> list[str]:
    root = profiles_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def profile_notebooks(profile: str) -> list[str]:
    """Notebook names the profile runs, in run order."""
    folder = profiles_root() / profile
    if not folder.is_dir():
        raise ConfigError(
            f"unknown profile {profile!r}; available profiles: {', '.join(available_profiles()) or 'none'}"
        )
    present = {p.stem for p in folder.glob("*.yaml")}
    unknown = present - set(NOTEBOOK_ORDER)
    if unknown:
        raise ConfigError(f"profile {profile!r} has parameters for unknown notebooks: {sorted(unknown)}")
    return [name for name in NOTEBOOK_ORDER if name in present]


def params_class(notebook: str) -> type:
    """The `Params` dataclass of a notebook."""
    if notebook not in NOTEBOOK_ORDER:
        raise ConfigError(f"unknown notebook {notebook!r}; known: {', '.join(NOTEBOOK_ORDER)}")
    module = importlib.import_module(f"heart_lib.experiments.{notebook}")
    return module.Params


def raw_profile_params(profile: str, notebook: str) -> dict[str, Any]:
    """The profile's YAML parameters for one notebook, unvalidated."""
    path = profiles_root() / profile / f"{notebook}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile {profile!r} has no parameters for notebook {notebook!r} ({path})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter names to values")
    return data


def load_params(profile: str, notebook: str) -> Any:
    """Validated parameters of one notebook in one profile."""
    return validate(notebook, raw_profile_params(profile, notebook))


def validate(notebook: str, values: dict[str, Any]) -> Any:
    """Build the notebook's `Params` from `values`, checking names, types and ranges.

    Unknown keys are ignored only when they are not parameter-like (papermill injects none), so a
    misspelt parameter is caught.
    """
    cls = params_class(notebook)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{notebook}: unknown parameter(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in values:
            kwargs[name] = _coerce(notebook, name, values[name], hints[name])
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{notebook}: missing parameter {name!r}")
    params = cls(**kwargs)
    check = getattr(params, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ConfigError(f"{notebook}: {err}") from err
    return params


# Direct papermill runs (no `-p profile ...`) write here; `results/scratch/` is ignored by git, so a
# trial run never overwrites a committed profile's results.
SCRATCH_PROFILE = "scratch"
_PLAIN = (bool, int, float, str, list, tuple, dict, type(None))
_KERNEL_NAMES = {"In", "Out", "profile"}  # IPython's history holders, and the profile itself


def parameters_cell(notebook: str) -> str:
    """The source of a notebook's `parameters` cell: the profile, then every `Params` field with its
    default, so the defaults have one source (`Params`) and papermill sees every parameter name."""
    lines = [f"profile = {_literal(SCRATCH_PROFILE)}  # the runner passes the profile; direct papermill runs "
             "write results/scratch/"]
    for f in dataclasses.fields(params_class(notebook)):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name} = {_literal(default)}")
    return "\n".join(lines)


def _literal(value: Any) -> str:
    """Python source of a default, strings in double quotes (the project's style)."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def notebook_params(notebook: str, namespace: dict[str, Any]) -> Any:
    """Validate the parameters a notebook received (its globals after the parameters cell).

    A plain value in the namespace that is no parameter can only come from papermill's injected
    cell (a misspelt `-p` name, which papermill merely warns about): it is an error here.
    """
    names = {f.name for f in dataclasses.fields(params_class(notebook))}
    stray = sorted(k for k, v in namespace.items() if not k.startswith("_") and k not in names | _KERNEL_NAMES
                   and isinstance(v, _PLAIN))
    if stray:
        raise ConfigError(f"{notebook}: unknown parameter(s) {stray}; allowed: {sorted(names)}")
    return validate(notebook, {k: v for k, v in namespace.items() if k in names})


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def _coerce(notebook: str, name: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type `hint`; ints are accepted for floats, lists for tuples."""
    where = f"{notebook}: parameter {name!r}"
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(notebook, name, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where} = {value!r}: expected {_describe(hint)}")
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r}: allowed values are {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list ({_describe(hint)})")
        args = get_args(hint)
        item = args[0] if args else Any
        coerced = [_coerce(notebook, f"{name}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(coerced) if origin is tuple else coerced
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a mapping")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    raise ConfigError(f"{where}: unsupported parameter type {hint!r}")


def _describe(hint: Any) -> str:
    return typing._type_repr(hint) if hasattr(typing, "_type_repr") else str(hint)
