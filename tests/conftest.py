import os

# Tests run on a 2-core machine, often beside each other: one intra-op thread keeps timings sane.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _isolate_process_group():
    """Each test starts as a plain single process: no launcher variables, no process group.

    A test that leaks RANK/WORLD_SIZE (or a live process group) would make every later in-process
    entry point wait for ranks that never come.
    """
    import os

    saved = {key: os.environ.get(key) for key in _LAUNCH_VARIABLES}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from dinov2 import distributed

    distributed.disable()


def pytest_collection_modifyitems(session, config, items):
    """SLURM tests first: the requeue test spends minutes waiting on the cluster, so under
    ``pytest -n 2 --dist loadfile`` (scripts/run_tests.sh) its worker starts it while the other
    worker runs the rest, instead of it running alone at the end. The sort is stable."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slurm") else 1)
