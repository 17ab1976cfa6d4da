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
    # An int where the default is a float is fine, and so is anything for a null default.
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
