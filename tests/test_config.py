import pytest
from omegaconf import OmegaConf

from dinov2.utils.config import ConfigError, load_config, load_saved_config, parse_overrides, save_config


def _write(path, text):
    path.write_text(text)
    return path


def test_defaults_then_file_then_overrides(tmp_path):
    recipe = _write(tmp_path / "recipe.yaml", "optim:\n  base_lr: 0.01\n  epochs: 7\nstudent:\n  arch: vit_small\n")
    cfg = load_config(recipe, ["optim.epochs=3", "crops.local_crops_number=2"])
    assert cfg.optim.base_lr == 0.01  # from the file
    assert cfg.optim.epochs == 3  # the override wins over the file
    assert cfg.student.arch == "vit_small"
    assert cfg.crops.local_crops_number == 2
    assert cfg.optim.weight_decay == 0.04  # untouched default


def test_unknown_keys_are_errors_naming_the_key(tmp_path):
    recipe = _write(tmp_path / "recipe.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"crops\.n_local"):
        load_config(None, ["crops.n_local=4"])
    with pytest.raises(ConfigError, match="recipe.yaml"):
        load_config(recipe)


def test_wrong_types_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.epochs.*int"):
        load_config(None, ["optim.epochs=ten"])
    with pytest.raises(ConfigError, match=r"ibot\.separate_head.*bool"):
        load_config(None, ["ibot.separate_head=3"])
    recipe = _write(tmp_path / "recipe.yaml", "crops:\n  global_crops_scale: 0.5\n")
    with pytest.raises(ConfigError, match=r"crops\.global_crops_scale.*list"):
        load_config(recipe)
    # An int where the default is a float is fine; null-default options have declared types.
    cfg = load_config(None, ["optim.base_lr=1", "student.embed_dim=64", "train.max_iterations=10"])
    assert cfg.optim.base_lr == 1 and cfg.student.embed_dim == 64


def test_override_parsing():
    parsed = parse_overrides(["a.b=1", "c=[1,2]", "d=text", "e=null"])
    assert OmegaConf.to_container(parsed) == {"a": {"b": 1}, "c": [1, 2], "d": "text", "e": None}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["no_equals_sign"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = _write(tmp_path / "bad.yaml", "optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["optim.epochs=2", "student.arch=vit_small"])
    path = save_config(cfg, tmp_path / "out")
    assert path.name == "config.yaml"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    again = load_saved_config(tmp_path / "out")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_packaged_recipes_are_valid():
    from dinov2.utils.config import configs_dir

    recipes = sorted((configs_dir() / "train").glob("*.yaml"))
    for recipe in recipes:
        load_config(recipe)


def test_null_sections_and_scalar_sections_are_errors_naming_the_section(tmp_path):
    # `optim:` with nothing under it is YAML null; it used to replace the whole section and fail
    # later with an AttributeError inside the training code.
    for text in ("optim:\n", "optim: null\n", "student:\n  arch: vit_small\noptim:\n"):
        recipe = _write(tmp_path / "recipe.yaml", text)
        with pytest.raises(ConfigError, match=r"recipe\.yaml: 'optim' is a section.*null"):
            load_config(recipe)
    with pytest.raises(ConfigError, match=r"recipe\.yaml: 'crops' is a section.*got 'big'"):
        load_config(_write(tmp_path / "recipe.yaml", "crops: big\n"))
    with pytest.raises(ConfigError, match=r"command-line override: 'optim' is a section.*None"):
        load_config(None, ["optim=null"])
    with pytest.raises(ConfigError, match=r"'student' is a section.*got 3"):
        load_config(None, ["student=3"])


def test_options_with_a_null_default_are_typed(tmp_path):
    with pytest.raises(ConfigError, match=r"command-line override: 'train\.max_iterations' must be of type int.*'abc'"):
        load_config(None, ["train.max_iterations=abc"])
    with pytest.raises(ConfigError, match=r"'train\.max_iterations' must be of type int.*1\.5"):
        load_config(None, ["train.max_iterations=1.5"])
    with pytest.raises(ConfigError, match=r"recipe\.yaml: 'student\.embed_dim' must be of type int.*'sixty'"):
        load_config(_write(tmp_path / "recipe.yaml", "student:\n  embed_dim: sixty\n"))
    with pytest.raises(ConfigError, match=r"'student\.mlp_ratio' must be of type float.*True"):
        load_config(None, ["student.mlp_ratio=true"])
    # Right types, an int for a float, and null ("not set") are accepted.
    cfg = load_config(None, ["train.max_iterations=10", "student.mlp_ratio=4", "student.depth=null"])
    assert cfg.train.max_iterations == 10 and cfg.student.mlp_ratio == 4 and cfg.student.depth is None


def test_every_null_default_has_a_declared_type():
    from dinov2.utils.config import NULL_DEFAULT_TYPES, get_default_config

    def null_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from null_keys(value, f"{prefix}{key}.")
            elif value is None:
                yield f"{prefix}{key}"

    defaults = OmegaConf.to_container(get_default_config())
    assert sorted(null_keys(defaults)) == sorted(NULL_DEFAULT_TYPES)


@pytest.mark.parametrize(
    "item, message",
    [
        (
            "MODEL.WEIGHTS=/runs/a/checkpoints/ckpt_00000100",
            r"'MODEL\.WEIGHTS' was renamed to 'train\.init_from_checkpoint'",
        ),
        (
            "evaluation.eval_period_iterations=500",
            r"'evaluation\.eval_period_iterations' was renamed to 'evaluation\.export_period_iterations'",
        ),
        ("train.saveckp_freq=5", r"'train\.saveckp_freq' was renamed to 'checkpointing\.period_iterations'"),
        ("train.cache_dataset=false", r"'train\.cache_dataset' was removed"),
        ("optim.lr=0.1", r"'optim\.lr' was removed: .*optim\.base_lr"),
    ],
)
def test_retired_keys_are_errors_naming_the_replacement(tmp_path, item, message):
    with pytest.raises(ConfigError, match="command-line override: " + message):
        load_config(None, [item])
    key, value = item.split("=")
    section, name = key.split(".")
    recipe = _write(tmp_path / "recipe.yaml", f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match="recipe.yaml: " + message):
        load_config(recipe)


def test_an_old_runs_saved_config_loads_with_retired_keys_mapped(tmp_path, caplog):
    # config.yaml as written before the keys were retired (the trainer also stored the scaled lr).
    old = _write(
        tmp_path / "config.yaml",
        "MODEL:\n  WEIGHTS: /runs/a/checkpoints/ckpt_00000100\n"
        "train:\n  saveckp_freq: 2\n  OFFICIAL_EPOCH_LENGTH: 50\n  cache_dataset: true\n"
        "optim:\n  lr: 0.001\n  base_lr: 0.002\n"
        "evaluation:\n  eval_period_iterations: 300\n"
        "checkpointing:\n  period_iterations: 0\n",
    )
    with caplog.at_level("INFO", logger="dinov2"):
        cfg = load_saved_config(old)
    assert cfg.train.init_from_checkpoint == "/runs/a/checkpoints/ckpt_00000100"
    assert cfg.evaluation.export_period_iterations == 300
    assert cfg.checkpointing.period_iterations == 100  # 0 meant every saveckp_freq epochs
    assert cfg.optim.base_lr == 0.002 and "lr" not in cfg.optim and "MODEL" not in cfg
    assert "'MODEL.WEIGHTS' was renamed to 'train.init_from_checkpoint'" in caplog.text
    with pytest.raises(ConfigError, match="was renamed"):  # new input given with it must use the new keys
        load_saved_config(tmp_path, ["MODEL.WEIGHTS=x"])


def test_loaded_config_is_read_only():
    from omegaconf.errors import ReadonlyConfigError

    cfg = load_config(None, ["optim.base_lr=0.01"])
    with pytest.raises(ReadonlyConfigError):
        cfg.optim.base_lr = 0.1
    with pytest.raises(ReadonlyConfigError):
        cfg.train.output_dir = "/elsewhere"


def test_schedule_given_in_epochs_or_iterations(tmp_path):
    with pytest.raises(ConfigError, match=r"either 'optim\.warmup_epochs'.*or 'optim\.warmup_iterations', not both"):
        load_config(None, ["optim.warmup_epochs=2", "optim.warmup_iterations=30"])
    recipe = _write(tmp_path / "recipe.yaml", "optim:\n  epochs: 3\n  total_iterations: 90\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: give either 'optim\.epochs'"):
        load_config(recipe)
    recipe = _write(tmp_path / "recipe.yaml", "optim:\n  warmup_iterations: 30\n")
    assert load_config(recipe).optim.warmup_iterations == 30
    # A later source giving the epochs key replaces the file's iterations.
    assert load_config(recipe, ["optim.warmup_epochs=2"]).optim.warmup_iterations is None
