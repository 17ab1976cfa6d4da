"""Training configuration: defaults, then an experiment file, then ``key=value`` overrides.

Every option lives in ``configs/ssl_default_config.yaml``. An experiment file may only set keys
that exist there, and a value must have the default's type (an int is accepted for a float).
Options whose default is ``null`` ("not set") have their type in :data:`NULL_DEFAULT_TYPES`. A
section (``optim``, ``student``, ...) stays a mapping: it can be neither null nor a single value.
Mistakes raise ``ConfigError`` naming the key and where it came from, instead of being silently
ignored or failing later inside the training code.

A key that was renamed or removed (:data:`RETIRED_KEYS`) is an error naming its replacement in a
recipe or an override; in a saved ``config.yaml`` of an older run (:func:`load_saved_config`) it
is mapped to its replacement, or dropped, with a logged note, so old runs stay evaluable. Each
schedule length can be given in "epochs" (units of ``train.OFFICIAL_EPOCH_LENGTH`` iterations) or
in iterations (:data:`SCHEDULE_KEY_PAIRS`); the one given last wins. The loaded config is
read-only: values derived from it (the scaled learning rate, the output directory) live on the
objects that compute them.

Evaluation and classifier training load their options through the same machinery: each task
is a :class:`ConfigSchema` (its defaults files under ``configs/``, the types of its null
defaults, its retired keys, and the value rules - :class:`OneOf`, :class:`Range`,
:class:`Length`, :class:`ExistingPath` - and cross-key checks that run once, on the merged
config, before it is made read-only). :func:`load_task_config` merges the defaults, a YAML
file, command-line flags (already mapped to their keys) and ``key=value`` overrides.
"""

import difflib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dinov2.utils.io import atomic_write_text

logger = logging.getLogger("dinov2")

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
        "ssl_default_config.yaml not found in "
        + " or ".join(str(c) for c in candidates)
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
    "optim.total_iterations": "int",
    "optim.warmup_iterations": "int",
    "optim.freeze_last_layer_iterations": "int",
    "teacher.warmup_teacher_temp_iterations": "int",
}

# Keys that no longer exist: (the key that replaced it, or None if removed; why). A recipe or an
# override that sets one gets an error with this text; an old run's saved config.yaml is migrated.
RETIRED_KEYS = {
    "MODEL.WEIGHTS": ("train.init_from_checkpoint", "a training checkpoint whose model weights start a fresh run"),
    "evaluation.eval_period_iterations": (
        "evaluation.export_period_iterations",
        "it sets the teacher-backbone export period, it runs no evaluation",
    ),
    "train.saveckp_freq": ("checkpointing.period_iterations", "checkpoints are counted in iterations only"),
    "train.cache_dataset": (None, "it was never read"),
    "optim.lr": (
        None,
        "the peak learning rate is computed at start-up from optim.base_lr, optim.scaling_rule "
        "and the global batch; set optim.base_lr (with optim.scaling_rule=none it is the peak lr)",
    ),
}

# Each schedule length in "epochs" (x train.OFFICIAL_EPOCH_LENGTH iterations) and in iterations.
# The iterations key, when not null, is the one used. Setting both in one file (or one override
# list) is an error; a later source setting either one replaces the earlier source's choice.
SCHEDULE_KEY_PAIRS = (
    ("optim.epochs", "optim.total_iterations"),
    ("optim.warmup_epochs", "optim.warmup_iterations"),
    ("optim.freeze_last_layer_epochs", "optim.freeze_last_layer_iterations"),
    ("teacher.warmup_teacher_temp_epochs", "teacher.warmup_teacher_temp_iterations"),
)


# ------------------------------------------------------------------ value rules, one per key
# A rule checks one option's value once the config is merged (nulls, "not set", are skipped; a
# required option is a ConfigSchema.required key). Applied to a list or an open mapping, a rule
# checks each element. ``check`` returns what is wrong, or None.
@dataclass(frozen=True)
class OneOf:
    choices: Tuple[Any, ...]

    def check(self, value) -> Optional[str]:
        return None if value in self.choices else f"must be one of {list(self.choices)}"


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (``low < value`` with ``low_open``, ``value < high`` with ``high_open``)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False  # for list elements, whose type the defaults do not fix

    def check(self, value) -> Optional[str]:
        kind = "an integer" if self.integer else "a number"
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.integer and isinstance(value, float))
        ):
            return f"must be {kind}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'<' if self.high_open else '<='} {self.high}"
        return None


@dataclass(frozen=True)
class Length:
    """A list of exactly ``n`` (or, with ``at_least``, at least ``n``) elements."""

    n: int
    at_least: bool = False
    whole: ClassVar[bool] = True  # checks the list itself, not each element

    def check(self, value) -> Optional[str]:
        if len(value) == self.n or (self.at_least and len(value) >= self.n):
            return None
        return f"must hold {'at least ' if self.at_least else ''}{self.n} value(s)"


@dataclass(frozen=True)
class ExistingPath:
    """A file or directory that exists (``kind``: ``file``, ``dir`` or ``any``)."""

    kind: str = "any"

    def check(self, value) -> Optional[str]:
        path = Path(value)
        exists = {"file": path.is_file, "dir": path.is_dir, "any": path.exists}[self.kind]()
        return None if exists else f"must be an existing {'file or directory' if self.kind == 'any' else self.kind}"


@dataclass(frozen=True)
class ConfigSchema:
    """One task's options: its defaults files (merged in order) and what a value must satisfy.

    ``null_types`` gives the type of each null default (``int``, ``float``, ``str``, ``bool``,
    ``list``, or ``scalar`` for a name-or-index), and of the options whose default's type is
    not theirs (``scalar``: ``both`` or a YAML boolean such as ``yes`` / ``no``). ``aliases`` maps a key to the command-line flag
    that sets it, so errors name both. ``checks`` are functions of the merged config that raise
    :class:`ConfigError` when options do not fit together (``a`` needs ``b``). ``fill`` computes
    the value of an option left null at load time (a default that depends on the machine).
    ``open_sections`` accept keys the user names.
    """

    name: str
    defaults: Tuple[str, ...]
    null_types: Mapping[str, str] = field(default_factory=dict)
    retired: Mapping[str, Tuple[Optional[str], str]] = field(default_factory=dict)
    rules: Mapping[str, Any] = field(default_factory=dict)
    required: Tuple[str, ...] = ()
    checks: Tuple[Callable[[DictConfig], None], ...] = ()
    open_sections: Tuple[str, ...] = ()
    schedule_pairs: Tuple[Tuple[str, str], ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    fill: Mapping[str, Callable[[], Any]] = field(default_factory=dict)

    def default_config(self) -> DictConfig:
        return OmegaConf.create(_merged_defaults(self.defaults))

    def describe(self, key: str) -> str:
        """``'knn.nb_knn' (--nb-knn)``: the key, and its flag where it has one."""
        flag = self.aliases.get(key)
        return f"'{key}'" + (f" ({flag})" if flag else "")


@functools.lru_cache(maxsize=None)
def _merged_defaults(names: Tuple[str, ...]) -> dict:
    """The defaults files merged in order, read once per process (a fresh config is made of it each time)."""
    cfg = OmegaConf.create({})
    for name in names:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(configs_dir() / name))
    return OmegaConf.to_container(cfg)


SSL_SCHEMA = ConfigSchema(
    "training",
    ("ssl_default_config.yaml",),
    null_types=NULL_DEFAULT_TYPES,
    retired=RETIRED_KEYS,
    schedule_pairs=SCHEDULE_KEY_PAIRS,
)


def _flat_keys(container: dict, prefix: str = "") -> list:
    keys = []
    for key, value in container.items():
        full_key = f"{prefix}{key}"
        keys.append(full_key)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, f"{full_key}."))
    return keys


def _retired_message(key: str, retired: Mapping = RETIRED_KEYS) -> str:
    replacement, why = retired[key]
    if replacement:
        return f"'{key}' was renamed to '{replacement}' ({why})"
    return f"'{key}' was removed: {why}"


def _check_retired(update: dict, source: str, retired: Mapping = RETIRED_KEYS) -> None:
    for key in _flat_keys(update):
        if key in retired:
            raise ConfigError(f"{source}: {_retired_message(key, retired)}")


def _pop(container: dict, key: str):
    """Remove a dotted ``key`` from nested dicts (and sections left empty); return its value."""
    *sections, name = key.split(".")
    parents, node = [], container
    for section in sections:
        parents.append((node, section))
        node = node[section]
    value = node.pop(name)
    for parent, section in reversed(parents):
        if parent[section]:
            break
        del parent[section]
    return value


def _get(container: dict, key: str, default=None):
    node = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(container: dict, key: str, value) -> None:
    *sections, name = key.split(".")
    for section in sections:
        container = container.setdefault(section, {})
    container[name] = value


def _migrate_retired(saved: dict, source: str) -> dict:
    """An older run's saved config with each retired key mapped to its replacement or dropped."""
    present = [key for key in _flat_keys(saved) if key in RETIRED_KEYS]
    for key in present:
        value = _pop(saved, key)
        replacement, _ = RETIRED_KEYS[key]
        if key == "train.saveckp_freq":
            # period_iterations 0 meant "every saveckp_freq epochs"; it now means "at the end only".
            if not _get(saved, "checkpointing.period_iterations"):
                epoch_length = _get(saved, "train.OFFICIAL_EPOCH_LENGTH", 1250)
                _set(saved, "checkpointing.period_iterations", int(value) * int(epoch_length))
        elif replacement and _get(saved, replacement) is None:
            _set(saved, replacement, value)
        logger.info(
            "%s: %s; %s",
            source,
            _retired_message(key),
            f"its value is read as '{replacement}'" if replacement else "its value is dropped",
        )
    return saved


def _check_schedule_pairs(merged: DictConfig, update: dict, source: str, pairs: Sequence = SCHEDULE_KEY_PAIRS) -> None:
    """Within one source at most one key of each pair; the one it sets replaces the other."""
    for epochs_key, iterations_key in pairs:
        sets_epochs = _get(update, epochs_key) is not None
        sets_iterations = _get(update, iterations_key) is not None
        if sets_epochs and sets_iterations:
            raise ConfigError(
                f"{source}: give either '{epochs_key}' (in units of train.OFFICIAL_EPOCH_LENGTH iterations) "
                f"or '{iterations_key}', not both"
            )
        if sets_epochs:
            OmegaConf.update(merged, iterations_key, None)  # an earlier source's iterations no longer apply


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
    if expected == "scalar":  # a name or an index (a positive class), a word or a switch (yes / no)
        return _type_name(value) in ("str", "int", "float", "bool")
    return _type_name(value) == expected


def _check_types(
    default: dict,
    update: dict,
    source: str,
    prefix: str = "",
    null_types: Mapping = NULL_DEFAULT_TYPES,
    aliases: Mapping = {},
) -> None:
    for key, new_value in update.items():
        if key not in default:
            continue  # unknown keys are reported by struct mode in _merge (open sections accept them)
        full_key = f"{prefix}{key}"
        default_value = default[key]
        if isinstance(default_value, dict):
            if isinstance(new_value, dict):
                _check_types(default_value, new_value, source, f"{full_key}.", null_types, aliases)
                continue
            # `optim:` with nothing under it is null, which would replace the whole section.
            keys = ", ".join(list(default_value)[:3])
            raise ConfigError(
                f"{source}: '{full_key}' is a section and must map its keys ({keys}, ...) to values, "
                f"got {new_value!r}" + (" (a key with nothing under it is null)" if new_value is None else "")
            )
        if full_key in null_types:  # null defaults, and options of a mixed type ("scalar")
            expected = null_types[full_key]
        elif default_value is None:
            continue  # not a default of the defaults file (the tests keep each table complete)
        else:
            expected = _type_name(default_value)
        if not _compatible(expected, new_value):
            raise ConfigError(
                f"{source}: '{full_key}'{f' ({aliases[full_key]})' if full_key in aliases else ''} must be of type {expected} "
                f"(default {default_value!r}), got {new_value!r} ({_type_name(new_value)})"
            )


def _nearest_key(key: str, base: DictConfig) -> str:
    """`` (did you mean 'x.y'?)`` for the valid key closest to a mistyped one, or ``""``."""
    close = difflib.get_close_matches(key, _flat_keys(OmegaConf.to_container(base)), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _merge(
    base: DictConfig, update: DictConfig, source: str, saved: bool = False, schema: Optional["ConfigSchema"] = None
) -> DictConfig:
    schema = schema or SSL_SCHEMA
    update_dict = OmegaConf.to_container(update)
    if saved:
        update = OmegaConf.create(_migrate_retired(update_dict, source))
        update_dict = OmegaConf.to_container(update)
    else:
        _check_retired(update_dict, source, schema.retired)
    _check_types(
        OmegaConf.to_container(base), update_dict, source, null_types=schema.null_types, aliases=schema.aliases
    )
    OmegaConf.set_struct(base, True)
    for section in schema.open_sections:  # user-named keys (e.g. one loss weight per task)
        OmegaConf.set_struct(OmegaConf.select(base, section), False)
    try:
        merged = OmegaConf.merge(base, update)
    except ConfigKeyError as error:
        raise ConfigError(
            f"{source}: unknown config key '{error.full_key}'{_nearest_key(error.full_key, base)} "
            f"({error.msg.splitlines()[0]})"
        ) from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {error}") from None
    OmegaConf.set_struct(merged, True)
    if not saved:  # a saved config holds every key of each pair; its iterations keys, when set, apply
        _check_schedule_pairs(merged, update_dict, source, schema.schedule_pairs)
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


def _load_file(config_file: PathLike) -> Tuple[DictConfig, Path]:
    path = resolve_config_path(config_file)
    try:
        file_cfg = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors: name the file
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    if not isinstance(file_cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return file_cfg, path


def parse_value(text: str):
    """A command-line value read as the value of a ``key=value`` override (``8`` -> 8, ``[1,2]``)."""
    return OmegaConf.to_container(parse_overrides([f"value={text}"]))["value"]


def load_config(
    config_file: Optional[PathLike] = None, overrides: Sequence[str] = (), saved: bool = False
) -> DictConfig:
    """Defaults, then ``config_file`` (if any), then command-line ``key=value`` overrides; read-only.

    ``saved``: ``config_file`` is a run's saved ``config.yaml`` (see :func:`load_saved_config`).
    """
    cfg = get_default_config()
    if config_file:
        file_cfg, path = _load_file(config_file)
        cfg = _merge(cfg, file_cfg, source=str(path), saved=saved)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), source="command-line override")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _float_keys(defaults: dict, null_types: Mapping, prefix: str = "") -> list:
    keys = []
    for key, value in defaults.items():
        full_key = f"{prefix}{key}"
        if isinstance(value, dict):
            keys.extend(_float_keys(value, null_types, f"{full_key}."))
        elif isinstance(value, float) or (value is None and null_types.get(full_key) == "float"):
            keys.append(full_key)
    return keys


def _apply_rules(cfg: DictConfig, schema: ConfigSchema) -> None:
    for key, rules in schema.rules.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        for rule in rules if isinstance(rules, tuple) else (rules,):
            whole = getattr(rule, "whole", False)
            if isinstance(value, DictConfig) and not whole:
                items = [(f"{key}.{k}", v) for k, v in value.items()]
            elif isinstance(value, ListConfig) and not whole:
                items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            else:
                items = [(key, value)]
            for name, item in items:
                problem = rule.check(item)
                if problem:
                    shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
                    raise ConfigError(
                        f"{schema.describe(key)} {problem}, got {shown!r}"
                        + (f" ({name}={item!r})" if name != key else "")
                    )


def validate(cfg: DictConfig, schema: ConfigSchema) -> DictConfig:
    """The once-at-load checks: required options, value rules, cross-key checks; floats made floats."""
    missing = [key for key in schema.required if OmegaConf.select(cfg, key) is None]
    if missing:
        raise ConfigError(f"{schema.name}: required option(s) not set: " + ", ".join(map(schema.describe, missing)))
    for key, compute in schema.fill.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, compute())
    _apply_rules(cfg, schema)
    for check in schema.checks:
        check(cfg)
    # An int given for a float option (lr=1) is stored as a float, so no use site needs a cast.
    for key in _float_keys(_merged_defaults(schema.defaults), schema.null_types):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, int) and not isinstance(value, bool):
            OmegaConf.update(cfg, key, float(value))
    return cfg


def load_task_config(
    schema: ConfigSchema,
    config_file: Optional[PathLike] = None,
    overrides: Sequence[str] = (),
    flags: Optional[Mapping[str, Any]] = None,
) -> DictConfig:
    """An evaluation's or classifier's options, validated once and read-only.

    The schema's defaults, then ``config_file`` (a path, or relative to ``configs/``), then
    ``flags`` (``{config key: value}`` from the command-line flags that map onto keys), then
    ``key=value`` ``overrides``: each later source wins.
    """
    cfg = schema.default_config()
    if config_file:
        file_cfg, path = _load_file(config_file)
        cfg = _merge(cfg, file_cfg, source=str(path), schema=schema)
    if flags:
        flag_cfg = OmegaConf.create({})
        for key, value in flags.items():
            OmegaConf.update(flag_cfg, key, value, force_add=True)
        cfg = _merge(cfg, flag_cfg, source="command-line flags", schema=schema)
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), source="command-line override", schema=schema)
    validate(cfg, schema)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, output_dir: PathLike, name: str = CONFIG_FILE_NAME) -> Path:
    """Write the merged config to ``output_dir/config.yaml`` atomically."""
    return atomic_write_text(Path(output_dir) / name, OmegaConf.to_yaml(cfg))


def load_saved_config(path: PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """A training output's ``config.yaml`` (or the directory holding it), checked against the defaults.

    A run saved before a key was retired still loads: its retired keys are mapped to their
    replacements or dropped, with a logged note (overrides given here must use the new keys).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE_NAME
    return load_config(path, overrides, saved=True)
