"""The entry scripts run from a clone that was never installed, and the library stays a library.

A copy of the repository's code runs under ``python -S`` with ``PYTHONPATH`` holding only the
folders of the installed dependencies: no ``.pth`` file is processed, so an editable install of
this checkout (its import hook maps ``dinov2`` and ``dinov2.configs`` to the original tree) is out
of reach, as it is on a machine where only the requirements are installed. The copy's ``dinov2``
and ``dinov2_tools`` report the file they were imported from, and its default config carries a
marker value, so each test knows that the copy's packages and the copy's configs were used.

The library imports none of the tooling in dinov2_tools, and its model layers no process-group
code: GlobalBatchNorm1d gets its cross-rank reduction as an argument.
"""

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import TINY_OVERRIDES, make_image_folder

REPO = Path(__file__).resolve().parents[1]
CODE = ["dinov2", "dinov2_tools", "configs", "train", "eval", "run", "scripts", "hubconf.py"]
MARKER_KEEP_EVERY = 4242  # checkpointing.keep_every: 0 in the defaults, not set by the recipe
IMPORTED = "[imported "


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clone") / "dinov2-clone"
    root.mkdir()
    for name in CODE:
        source = REPO / name
        if not source.exists():
            continue  # an older tree (the tests below then say what is missing)
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    for package in ("dinov2", "dinov2_tools"):
        if not (root / package).is_dir():
            continue
        with open(root / package / "__init__.py", "a") as handle:
            handle.write(f"\nimport sys as _sys\n\n_sys.stderr.write({IMPORTED!r} + __file__ + ']\\n')\n")
    default = root / "configs" / "ssl_default_config.yaml"
    text = default.read_text()
    assert text.count("\n  keep_every: 0 ") == 1
    default.write_text(text.replace("\n  keep_every: 0 ", f"\n  keep_every: {MARKER_KEEP_EVERY} "))
    return root


def _dependency_path() -> str:
    """The folders holding the installed requirements (normally one site-packages)."""
    folders = []
    for module in ("torch", "torchvision", "omegaconf", "numpy", "PIL", "submitit"):
        folder = str(Path(importlib.util.find_spec(module).origin).parent.parent)
        if folder not in folders:
            folders.append(folder)
    return os.pathsep.join(folders)


def run_isolated(args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=_dependency_path(), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def imported_packages(stderr: str) -> list:
    """The ``__init__.py`` files of dinov2 / dinov2_tools that the run imported."""
    return [Path(line[len(IMPORTED) : -1]) for line in stderr.splitlines() if line.startswith(IMPORTED)]


def test_the_original_package_is_out_of_reach_of_the_isolated_interpreter(tmp_path):
    result = run_isolated(["-c", "import dinov2"], cwd=tmp_path)
    assert result.returncode != 0 and "No module named 'dinov2'" in result.stderr, result.stderr[-2000:]


# train/train.py itself runs a training step below.
@pytest.mark.parametrize(
    "script, expected, package",
    [
        ("eval/knn.py", "--pretrained-weights", "dinov2"),
        ("run/eval/knn.py", "--ngpus", "dinov2"),
        ("scripts/make_shapes_dataset.py", "--val-fraction", "dinov2_tools"),
    ],
)
def test_entry_script_runs_from_a_clone_without_install(clone, script, expected, package):
    result = run_isolated([script, "--help"], cwd=clone)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    assert imported_packages(result.stderr) == [clone / package / "__init__.py"]


def test_training_from_a_clone_reads_the_clone_configs(clone, tmp_path):
    images = make_image_folder(tmp_path / "images", n_classes=2, per_class=4)
    out = tmp_path / "run"
    # From the clone's root, as the README shows; the recipe name is resolved inside configs/.
    result = run_isolated(
        [
            "train/train.py",
            "--config-file",
            "train/quickdraw_vit_tiny.yaml",
            "--output-dir",
            str(out),
            f"train.dataset_path=ImageFolder:root={images}:cache=false",
            *TINY_OVERRIDES,
            "train.max_iterations=1",
            "checkpointing.period_iterations=1",
            "evaluation.knn_period_iterations=0",
            "compute_precision.param_dtype=fp32",
            "compute_precision.teacher_dtype=fp32",
        ],
        cwd=clone,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert imported_packages(result.stderr) == [clone / "dinov2" / "__init__.py"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["checkpointing"]["keep_every"] == MARKER_KEEP_EVERY  # the clone's defaults ...
    assert saved["teacher"]["momentum_teacher"] == 0.9  # ... under the clone's recipe
    assert saved["train"]["max_iterations"] == 1
    assert (out / "training_metrics.jsonl").read_text().strip()


def test_recipe_names_resolve_inside_the_clone_configs(clone, tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from dinov2.utils.config import configs_dir, "
        "resolve_config_path; print(configs_dir()); print(resolve_config_path('train/quickdraw_vit_tiny.yaml'))"
    )
    result = run_isolated(["-c", code, str(clone)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        str(clone / "configs"),
        str(clone / "configs" / "train" / "quickdraw_vit_tiny.yaml"),
    ]


def test_hubconf_loads_from_a_clone(clone, tmp_path):
    code = (
        "import sys, torch; model = torch.hub.load(sys.argv[1], 'dinov2_vits14', source='local', "
        "pretrained=False); print(type(model).__name__, model.embed_dim)"
    )
    result = run_isolated(["-c", code, str(clone)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["DinoVisionTransformer", "384"]
    assert imported_packages(result.stderr) == [clone / "dinov2" / "__init__.py"]


def _imported_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_imports_no_tooling_and_layers_no_process_groups():
    offenders = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "dinov2").rglob("*.py"))
        if any(name.split(".")[0] == "dinov2_tools" for name in _imported_modules(path))
    ]
    assert offenders == []
    # Model layers take their collectives as arguments (GlobalBatchNorm1d's all_reduce).
    layers = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "dinov2" / "layers").rglob("*.py"))
        if any(
            name == "dinov2.distributed" or name.startswith(("dinov2.distributed.", "torch.distributed"))
            for name in _imported_modules(path)
        )
    ]
    assert layers == []


def test_global_batch_norm_statistics_come_from_the_injected_reduction():
    import torch

    from dinov2.layers.batch_norm import GlobalBatchNorm1d

    x = torch.randn(7, 5) * 2 + 3
    calls = []

    def one_process(stats):  # the sum over a single rank is the tensor itself
        calls.append(stats.shape)
        return stats

    reference, ours = torch.nn.BatchNorm1d(5), GlobalBatchNorm1d(5, all_reduce=one_process)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(7, 5)
    (reference(x1) * weights).sum().backward()
    (ours(x2) * weights).sum().backward()
    assert len(calls) == 2  # two collectives per training forward: count and sums, then deviations
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    ours.eval()
    torch.testing.assert_close(ours(x), reference.eval()(x))
    assert len(calls) == 2  # eval mode: running statistics, no collective

    # Two ranks holding the same rows: the statistics (row count included) are those of both.
    both = torch.nn.BatchNorm1d(5)
    expected = both(torch.cat([x, x]))[:7]
    doubled = GlobalBatchNorm1d(5, all_reduce=lambda stats: 2 * stats)
    torch.testing.assert_close(doubled(x), expected)
    torch.testing.assert_close(doubled.running_var, both.running_var)
