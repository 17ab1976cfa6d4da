"""Evaluation and classifier options: the training config machinery (defaults files, a YAML file,
flags, key=value overrides; checked once at load, read-only afterwards)."""

import functools
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from dinov2.classify.config import SCHEMA as CLASSIFY_SCHEMA
from dinov2.classify.config import load_classify_config
from dinov2.eval import knn, linear, log_regression, pca
from dinov2.eval.config import FLAGS, SCHEMAS, config_from_args
from dinov2.utils.config import ConfigError

RUN = str(Path(__file__).resolve().parent)  # an existing directory: configs only, nothing is loaded from it
PARSERS = {"knn": knn, "linear": linear, "log_regression": log_regression, "pca": pca}
# The options a method cannot run without (the flags' test adds its own on top).
REQUIRED = {
    "knn": ["--pretrained-weights", RUN, "--train-dataset", "T", "--val-dataset", "V"],
    "linear": ["--pretrained-weights", RUN, "--train-dataset", "T"],
    "log_regression": ["--pretrained-weights", RUN, "--train-dataset", "T"],
    "pca": ["--pretrained-weights", RUN, "--images", "a.png", "--output", "out.png"],
}
CLASSIFY_REQUIRED = ["output_dir=out", "data.train=CSV:path=labels.csv"]


@functools.lru_cache(maxsize=None)
def parser_of(method):
    return PARSERS[method].get_args_parser()


def eval_config(method, *argv):
    return config_from_args(method, parser_of(method).parse_args([*REQUIRED[method], *argv]))


def test_eval_yaml_then_flags_then_overrides(tmp_path):
    options = tmp_path / "knn.yaml"
    options.write_text("knn:\n  temperature: 0.1\n  nb_knn: [5, 10]\ndata:\n  batch_size: 32\n  num_workers: 1\n")
    cfg = eval_config("knn", "--eval-config", str(options), "--batch-size", "16", "knn.nb_knn=[3]")
    assert cfg.knn.temperature == 0.1  # from the file
    assert cfg.data.num_workers == 1  # from the file
    assert cfg.data.batch_size == 16  # the flag wins over the file
    assert list(cfg.knn.nb_knn) == [3]  # the override wins over the file
    assert cfg.knn.bank_chunk_size == 65536  # untouched default
    assert cfg.data.train == "T" and cfg.backbone.pretrained_weights == RUN
    # A key outside the evaluation's sections overrides the training config of the backbone.
    cfg = eval_config("knn", "student.arch=vit_small", "crops.global_crops_size=32", "knn.plot_k=10")
    assert list(cfg.backbone.overrides) == ["student.arch=vit_small", "crops.global_crops_size=32"]
    assert cfg.knn.plot_k == 10


def test_classifier_yaml_then_overrides(tmp_path):
    options = tmp_path / "probe.yaml"
    options.write_text("optim:\n  mode: lpft\n  epochs: 4\n  head_lr: 1\nheads:\n  loss_weights: {shape: 2}\n")
    cfg = load_classify_config(options, [*CLASSIFY_REQUIRED, "optim.epochs=6", "lpft.probe_epochs=2"])
    assert cfg.optim.mode == "lpft" and cfg.optim.epochs == 6 and cfg.lpft.probe_epochs == 2
    assert cfg.optim.head_lr == 1.0 and isinstance(cfg.optim.head_lr, float)  # no cast needed where it is used
    assert dict(cfg.heads.loss_weights) == {"shape": 2}  # an open section: task names are the user's
    assert cfg.checkpointing.keep_last == 2 and cfg.logging.log_period_iterations == 50


def test_unknown_keys_name_the_key_and_the_nearest_one():
    with pytest.raises(ConfigError, match=r"'knn\.temprature'.*did you mean 'knn\.temperature'"):
        eval_config("knn", "knn.temprature=0.1")
    with pytest.raises(ConfigError, match=r"'optim\.head_learning_rate'"):
        load_classify_config(None, [*CLASSIFY_REQUIRED, "optim.head_learning_rate=0.1"])
    with pytest.raises(ConfigError, match=r"'data\.batchsize'.*did you mean 'data\.batch_size'"):
        load_classify_config(None, [*CLASSIFY_REQUIRED, "data.batchsize=8"])


def test_wrong_types_name_the_key_and_value():
    with pytest.raises(
        ConfigError, match=r"command-line flags: 'knn\.temperature' \(--temperature\) must be of type float.*'warm'"
    ):
        eval_config("knn", "--temperature", "warm")
    with pytest.raises(ConfigError, match=r"'optim\.epochs' must be of type int.*'ten'"):
        load_classify_config(None, [*CLASSIFY_REQUIRED, "optim.epochs=ten"])
    with pytest.raises(ConfigError, match=r"'knn\.nb_knn' \(--nb-knn\) must be an integer.*knn\.nb_knn\[1\]=2\.5"):
        eval_config("knn", "--nb-knn", "1", "2.5")


@pytest.mark.parametrize(
    "method, argv, message",
    [
        ("knn", ["--nb-knn", "0"], r"'knn\.nb_knn' \(--nb-knn\) must be >= 1, got \[0\]"),
        ("knn", ["--temperature", "0"], r"'knn\.temperature' \(--temperature\) must be > 0, got 0"),
        ("knn", ["--batch-size", "0"], r"'data\.batch_size' \(--batch-size\) must be >= 1, got 0"),
        ("knn", ["--precision", "fp8"], r"'backbone\.precision' \(--precision\) must be one of .*'fp16'.*got 'fp8'"),
        ("knn", ["--arch", "dinov2_vitx14"], r"'backbone\.arch' \(--arch\) must be one of .*got 'dinov2_vitx14'"),
        (
            "linear",
            ["--avgpool", "sometimes"],
            r"'linear\.avgpool' \(--avgpool\) must be one of \['both', True, False\], got 'sometimes'",
        ),
        ("linear", ["--val-fraction", "1.5"], r"'linear\.val_fraction' \(--val-fraction\) must be < 1, got 1\.5"),
        ("log_regression", ["--features", "patch"], r"'log_regression\.features' \(--features\) must be one of"),
        (
            "knn",
            ["--image-size", "32", "--resize-size", "16"],
            r"--resize-size \(backbone\.resize_size\) 16 is smaller",
        ),
        (
            "pca",
            ["--pretrained-weights", "no/such/run"],
            r"'backbone\.pretrained_weights' \(--pretrained-weights\) must be an existing file or directory, "
            r"got 'no/such/run'",
        ),
        ("linear", ["--augment"], r"--augment needs --feature-mode online"),
    ],
)
def test_bad_eval_values_name_the_key_and_value(method, argv, message):
    with pytest.raises(ConfigError, match=message):
        eval_config(method, *argv)


def test_bad_eval_values_exit_with_the_message_from_the_command_line():
    with pytest.raises(SystemExit, match=r"'knn\.temperature' \(--temperature\) must be > 0"):
        knn.main([*REQUIRED["knn"], "--temperature", "-1"])
    with pytest.raises(SystemExit, match=r"give --val-dataset and/or --test-dataset"):
        knn.main(["--pretrained-weights", RUN, "--train-dataset", "T"])
    with pytest.raises(SystemExit, match=r"required option\(s\) not set: 'data\.train' \(--train-dataset\)"):
        knn.main(["--pretrained-weights", RUN, "--val-dataset", "V"])


def test_training_and_classifier_commands_exit_with_the_config_message():
    """A mistyped key on the training or classifier command line ends with the loader's message
    (the key and its nearest valid name), not a traceback."""
    from dinov2.classify.train import main as classify_main
    from dinov2.train.train import main as train_main

    with pytest.raises(SystemExit, match=r"dinov2 training: .*unknown config key 'optim\.lrr' \(did you mean"):
        train_main(["optim.lrr=1"])
    with pytest.raises(SystemExit, match=r"dinov2 classifier training: .*unknown config key 'optim\.lrr'"):
        classify_main(CLASSIFY_REQUIRED + ["optim.lrr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.mode=finetune", r"'optim\.mode' must be one of \['probe', 'partial', 'full', 'lpft'\], got 'finetune'"),
        ("optim.amp=fp8", r"'optim\.amp' must be one of .*got 'fp8'"),
        ("heads.pooling=max", r"'heads\.pooling' must be one of .*got 'max'"),
        ("data.val_fraction=1", r"'data\.val_fraction' must be < 1, got 1"),
        ("data.mean=[0.5,0.5]", r"'data\.mean' must hold 3 value\(s\), got \[0\.5, 0\.5\]"),
        ("lpft.r=0", r"'lpft\.r' must be >= 1, got 0"),
        ("data.interpolation=cubic", r"'data\.interpolation' must be one of .*got 'cubic'"),
        ("heads.loss_weights.shape=-1", r"'heads\.loss_weights' must be >= 0.*heads\.loss_weights\.shape=-1"),
        ("data.resize_size=100", r"'data\.resize_size' 100 must be >= 'data\.crop_size' 224"),
        ("optim.cache_features=true", r"'optim\.cache_features' needs optim\.mode=probe"),
    ],
)
def test_bad_classifier_values_name_the_key_and_value(override, message):
    extra = ["optim.mode=full"] if "cache_features" in override else []
    with pytest.raises(ConfigError, match=message):
        load_classify_config(None, [*CLASSIFY_REQUIRED, *extra, override])


def test_retired_classifier_keys_name_their_replacement(tmp_path):
    with pytest.raises(ConfigError, match=r"'checkpoint\.keep' was renamed to 'checkpointing\.keep_last'"):
        load_classify_config(None, [*CLASSIFY_REQUIRED, "checkpoint.keep=5"])
    options = tmp_path / "old.yaml"
    options.write_text("log_every: 10\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: 'log_every' was renamed to 'logging\.log_period_iterations'"):
        load_classify_config(options, CLASSIFY_REQUIRED)


def test_required_options_are_named():
    with pytest.raises(ConfigError, match=r"required option\(s\) not set: 'output_dir', 'data\.train'"):
        load_classify_config(None, [])


def test_loaded_configs_are_read_only():
    cfg = eval_config("linear")
    with pytest.raises(ReadonlyConfigError):
        cfg.linear.epochs = 3
    cfg = load_classify_config(None, CLASSIFY_REQUIRED)
    with pytest.raises(ReadonlyConfigError):
        cfg.optim.mode = "full"
    with pytest.raises(ReadonlyConfigError):
        cfg.heads.loss_weights["shape"] = 1.0


def _sample(flag, default):
    """A value for ``flag`` and the same value written for a key=value override."""
    samples = {
        "backbone.arch": "dinov2_vits14",
        "backbone.pretrained_weights": str(Path(RUN).parent),
        "backbone.precision": "bf16",
        "backbone.config_file": "run/config.yaml",
        "linear.avgpool": "no",
        "linear.feature_mode": "online",
        "log_regression.features": "cls_avgpool",
        "data.positive_class": "defect",
        "backbone.image_size": "28",
        "backbone.resize_size": "32",
    }
    if flag.key in samples:
        return [samples[flag.key]], samples[flag.key]
    if flag.kind in ("switch", "on"):
        value = not default  # true for a null or false default
        return (flag.name if value else "--no-" + flag.name[2:]), str(value).lower()
    if flag.nargs:
        values = (
            ["a.png", "b.png"]
            if flag.kind == "text"
            else (["2", "3"] if isinstance(default[0], int) else ["0.5", "0.25"])
        )
        return values, "[" + ",".join(values) + "]"
    if flag.kind == "text":
        return ["somewhere/x"], "somewhere/x"
    value = "0.5" if isinstance(default, float) or flag.key.endswith(("fraction", "threshold")) else "3"
    return [value], value


@pytest.mark.parametrize("method", sorted(FLAGS))
def test_each_flag_gives_the_same_config_as_its_key(method):
    defaults = SCHEMAS[method].default_config()
    default = OmegaConf.to_container(eval_config(method))
    for flag in FLAGS[method]:
        given, written = _sample(flag, OmegaConf.select(defaults, flag.key))
        argv = [given] if isinstance(given, str) else [flag.name, *given]
        needs = ["--feature-mode", "online"] if flag.key == "linear.augment" else []  # cached mode never augments
        from_flag = eval_config(method, *needs, *argv)
        from_key = eval_config(method, *needs, f"{flag.key}={written}")
        assert OmegaConf.to_container(from_flag) == OmegaConf.to_container(from_key), flag.name
        assert OmegaConf.to_container(from_flag) != default or flag.key in (
            "backbone.pretrained_weights",
            "data.train",
            "data.val",
            "pca.images",
            "pca.output",
        ), f"{flag.name} changed nothing"


@pytest.mark.parametrize("schema", [*SCHEMAS.values(), CLASSIFY_SCHEMA], ids=[*SCHEMAS, "classify"])
def test_every_null_default_has_a_declared_type(schema):
    def null_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from null_keys(value, f"{prefix}{key}.")
            elif value is None:
                yield f"{prefix}{key}"

    defaults = OmegaConf.to_container(schema.default_config())
    mixed = [
        key
        for key, kind in schema.null_types.items()
        if kind == "scalar" and OmegaConf.select(schema.default_config(), key) is not None
    ]
    assert sorted(null_keys(defaults)) == sorted(set(schema.null_types) - set(mixed))


def test_command_line_defaults_match_the_library_defaults():
    from dinov2.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
    from dinov2.eval.linear import DEFAULT_LEARNING_RATES, DEFAULT_N_LAST_BLOCKS
    from dinov2.eval.log_regression import DEFAULT_C_VALUES, DEFAULT_MAX_ITER

    assert tuple(eval_config("knn").knn.nb_knn) == DEFAULT_KS
    assert eval_config("knn").knn.temperature == DEFAULT_TEMPERATURE
    cfg = eval_config("linear")
    assert tuple(cfg.linear.learning_rates) == DEFAULT_LEARNING_RATES
    assert tuple(cfg.linear.n_last_blocks) == DEFAULT_N_LAST_BLOCKS
    cfg = eval_config("log_regression")
    assert tuple(cfg.log_regression.c_values) == DEFAULT_C_VALUES
    assert cfg.log_regression.max_iter == DEFAULT_MAX_ITER


def test_the_docs_table_lists_every_flag_with_its_key():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    missing = [
        f"{f.name} -> {f.key}" for flags in FLAGS.values() for f in flags if f"| `{f.name}` | `{f.key}` |" not in docs
    ]
    assert not missing
