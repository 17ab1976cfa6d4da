from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="dinov2",
    version="0.1.0",
    description="DINOv2-class self-supervised pretraining and evaluation of vision transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # dinov2_tools (data fetching, synthetic demo datasets, benchmarks) ships beside the library
    # for the scripts and the dinov2-make-shapes console script; dinov2 never imports it.
    packages=find_packages(include=["dinov2", "dinov2.*", "dinov2_tools"]) + ["dinov2.configs"],
    # The configs live at the top of the repository (configs/) and ship inside the package.
    package_dir={"dinov2.configs": "configs"},
    package_data={"dinov2.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "omegaconf>=2.3",
        "submitit>=1.5",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "pillow>=9.0",
        "webdataset>=0.2.86",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "pandas>=2.0",
    ],
    extras_require={
        "xformers": ["xformers"],
        "lora": ["peft>=0.10"],
        "serve": ["fastapi>=0.165", "uvicorn>=0.27", "python-multipart>=0.0.9", "prometheus_client>=0.20"],
        "timm": ["timm>=0.9"],
        # Strict libjpeg-turbo decoding: corrupt JPEG data behind a valid header is a bad image.
        "jpeg": ["simplejpeg>=1.6"],
        # Backbones for transformers (Dinov2WithRegistersModel needs 4.48), and ONNX export
        # (torch's default exporter translates with onnxscript) and serving with ONNX Runtime.
        "interop": ["transformers>=4.48", "onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        # WebDataset shards at s3://, gs://, ... URLs (plus the protocol's package: s3fs, gcsfs, adlfs).
        "remote": ["fsspec>=2023.1"],
        # logging.tensorboard (torch.utils.tensorboard writes, tensorboard reads) and logging.wandb.
        "tracking": ["tensorboard>=2.14", "wandb>=0.16"],
        "dev": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",  # scripts/run_tests.sh runs the suite in 2 processes (2 cores)
            "httpx>=0.27",
            "peft>=0.10",
            "fastapi>=0.165",
            "uvicorn>=0.27",
            "python-multipart>=0.0.9",
            "prometheus_client>=0.20",  # the service's /metrics
            "timm>=0.9",  # the optional timm backbone is tested too
            "simplejpeg>=1.6",  # and the strict JPEG check
            "transformers>=4.48",  # and the transformers / ONNX interop
            "onnx>=1.16",
            "onnxscript>=0.2",
            "onnxruntime>=1.18",
            "tensorboard>=2.14",  # and the experiment tracking sinks
            "wandb>=0.16",
            "fsspec>=2023.1",  # and WebDataset shards at fsspec URLs (memory://, file://)
            "ruff>=0.6",  # lint and format, run by .ci/run before the tests
        ],
    },
    entry_points={
        "console_scripts": [
            "dinov2-train=dinov2.train.train:main",
            "dinov2-knn=dinov2.eval.knn:main",
            "dinov2-linear=dinov2.eval.linear:main",
            "dinov2-logreg=dinov2.eval.log_regression:main",
            "dinov2-submit=dinov2.run.submit:main",
            "dinov2-consolidate=dinov2.checkpoint.consolidate:main",
            "dinov2-classify=dinov2.classify.train:main",
            "dinov2-predict=dinov2.classify.predict:main",
            "dinov2-serve=dinov2.classify.serve:main",
            "dinov2-check-setup=dinov2.classify.check_setup:main",
            "dinov2-make-shapes=dinov2_tools.shapes:main",
        ]
    },
)
