"""Shared pytest set-up for raytag's tests."""

from __future__ import annotations

import pytest

from tests.ray_cluster import ray_cluster  # noqa: F401  (registers the fixtures)
from tests.s3_server import aws_env, s3_server  # noqa: F401


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """The demo config's full run (configs/demo.yaml, ~2 minutes on 2 cores), trained once per session
    and shared by tests/test_train.py and tests/test_report.py: (run folder, train_loop's result)."""
    from pathlib import Path

    from raytag.trainer.config import load_config, to_dict
    from raytag.trainer.loop import train_loop

    tmp = tmp_path_factory.mktemp("demo")
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    res = train_loop(to_dict(load_config(demo, [f"run.storage={tmp}", "run.name=demo"])))
    return tmp / "demo", res


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, with the reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected: torch takes seconds to import

    if torch.cuda.is_available():
        return
    reason = (
        f"needs CUDA: torch.cuda.is_available() is false (torch {torch.__version__}, "
        f"built for CUDA {torch.version.cuda or 'none'})"
    )
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason=reason))
