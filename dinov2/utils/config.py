"""Training configuration: defaults, then an experiment file, then ``key=value`` overrides.

Every option lives in ``configs/ssl_default_config.yaml``. An experiment file may only set keys
that exist there, and a value must have the default's type (an int is accepted for a float).
Options whose default is ``null`` ("not set") have their type in :data:`NULL_DEFAULT_TYPES`. A
section (``optim``, ``student``, ...) stays a mapping: it can be neither null nor a single value.
Mistakes raise ``ConfigError`` naming the key and where it came from, instead of being silently
ignored or failing later inside the training code.
"""

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dinov2.utils.io import atomic_write_text

CONFIG_FILE_NAME = "config.yaml"
PathLike = Union[str, os.PathLike]


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a value of the wrong type."""


# An installed package carries the configs as dinov2/configs/ (setup.py ships the top-level
# configs/ as ``dinov2.configs``); a clone, used as is or through ``pip install -e .``, has them
# beside dinov2/. Looked up from this file rather than through the import system, so a clone run
# without installing, or beside an install of another checkout, reads its own configs.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def configs_dir() -> Path:
    """The directory holding ``ssl_default_config.yaml`` and the ``train/`` recipes."""
    candidates = (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs")
    for candidate in candidates:
        if (candidate / "ssl_default_config.yaml").is_file():
            return candidate
    raise ConfigError(
        "ssl_default_config.yaml not found in " + " or ".join(str(c) for c in candidates)
        + " (installed package, source checkout): reinstall dinov2 or restore configs/"
    )


def default_config_path() -> Path:
    return configs_dir() / "ssl_default_config.yaml"


def get_default_config() -> DictConfig:
    return OmegaConf.load(default_config_path())


def resolve_config_path(config_file: PathLike) -> Path:
    """A path as given, or relative to the packaged ``configs/`` directory (``train/x.yaml``)."""
    path = Path(config_file)
    if path.is_file():
        return path
    packaged = configs_dir() / path
    if packaged.is_file():
        return packaged
    raise ConfigError(f"config file not found: {config_file} (also looked in {configs_dir()})")


# The type of each option whose default is null: the YAML default cannot carry it. A null value
# stays allowed (it means "not set"). tests/test_config.py checks that every null default is here.
NULL_DEFAULT_TYPES = {
    "train.max_iterations": "int",
    "student.embed_dim": "int",
    "student.depth": "int",
    "student.num_heads": "int",
    "student.mlp_ratio": "float",
}


def _type_name(value) -> str:
    if isinstance(value, (DictConfig, dict)):
        return "mapping"
    if isinstance(value, (ListConfig, list, tuple)):
        return "list"
    return type(value).__name__


def _compatible(expected: str, value) -> bool:
    """Whether ``value`` fits an option of type ``expected`` (a :func:`_type_name`)."""
    if value is None:
        return True  # null is "not set" (e.g. student.layerscale: null turns LayerScale off)
    if expected == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return _type_name(value) == expected


def _check_types(default: dict, update: dict, source: str, prefix: str = "") -> None:
    for key, new_value in update.items():
        if key not in default:
            continue  # unknown keys are reported by struct mode in _merge (open sections accept them)
        full_key = f"{prefix}{key}"
        default_value = default[key]
        if isinstance(default_value, dict):
            if isinstance(new_value, dict):
                _check_types(default_value, new_value, source, prefix=f"{full_key}.")
                continue
            # `optim:` with nothing under it is null, which would replace the whole section.
            keys = ", ".join(list(default_value)[:3])
            raise ConfigError(
                f"{source}: '{full_key}' is a section and must map its keys ({keys}, ...) to values, "
                f"got {new_value!r}" + (" (a key with nothing under it is null)" if new_value is None else "")
            )
        if default_value is None:
            expected = NULL_DEFAULT_TYPES.get(full_key)
            if expected is None:
                continue  # not a default of ssl_default_config.yaml (the test keeps the table complete)
        else:
            expected = _type_name(default_value)
        if not _compatible(expected, new_value):
            raise ConfigError(
                f"{source}: '{full_key}' must be of type {expected} "
                f"(default {default_value!r}), got {new_value!r} ({_type_name(new_value)})"
            )


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    _check_types(OmegaConf.to_container(base), OmegaConf.to_container(update), source)
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, update)
    except ConfigKeyError as error:
        raise ConfigError(f"{source}: unknown config key '{error.full_key}' ({error.msg.splitlines()[0]})") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {error}") from None
    OmegaConf.set_struct(merged, True)
    return merged


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """``["optim.lr=0.1", "crops.local_crops_number=4"]`` -> a DictConfig."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot parse overrides {overrides}: {error}") from None


def load_config(config_file: Optional[PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then ``config_file`` (if any), then command-line ``key=value`` overrides."""
    cfg = get_default_config()
    if config_file:
        path = resolve_config_path(config_file)
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as error:  # YAML syntax errors: name the file
            raise ConfigError(f"cannot parse config file {path}: {error}") from None
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        cfg = _merge(cfg, file_cfg, source=str(path))
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), source="command-line override")
    return cfg


def save_config(cfg: DictConfig, output_dir: PathLike, name: str = CONFIG_FILE_NAME) -> Path:
    """Write the merged config to ``output_dir/config.yaml`` atomically."""
    return atomic_write_text(Path(output_dir) / name, OmegaConf.to_yaml(cfg))


def load_saved_config(path: PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """A training output's ``config.yaml`` (or the directory holding it), checked against the defaults."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE_NAME
    return load_config(path, overrides)
