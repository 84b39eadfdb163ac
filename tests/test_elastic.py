"""Elastic training: a run whose worker group changes size between checkpoints trains on the same
global batches, and its model and optimizer state load at the new size (ZeRO-2 and ZeRO-3: DeepSpeed's
universal checkpoint; ZeRO-0 state holds the whole optimizer).

Two workers are two processes on this machine, each running `train_loop` under one gloo group,
sharing the run folder (as Ray Train's workers do on one node).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import run_losses, train_demo
from tests.ray_cluster import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SMALL = [
    "data.max_train_samples=120",
    "data.max_eval_samples=16",
    "data.test=null",
    "train.batch_tokens=256",
    "train.log_every=1",
    "model.dropout=0.0",
    "scaling.num_workers=[1,2]",  # the plan: 2 lanes a step, whatever the group's size
]


def _rank(rank: int, world: int, port: int, storage: str, name: str, overrides: list[str]) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)  # as Ray Train does
    try:
        train_demo(storage, name, *overrides)
    finally:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def train(world: int, storage: Path, name: str, *overrides: str) -> None:
    """Run `name` with a group of `world` workers (1: in this process)."""
    if world == 1:
        train_demo(storage, name, *overrides)
        return
    args = (world, free_ports(1)[0], str(storage), name, list(overrides))
    torch.multiprocessing.spawn(_rank, args=args, nprocs=world, join=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_group_that_shrinks_and_grows_follows_the_fixed_size_run(tmp_path, monkeypatch, stage):
    """Steps 1-2 on 2 workers, 3-4 on 1, 5-6 on 2 again, each stage resumed from the last one's
    checkpoint, give the losses of the same run on 2 workers throughout; every window of each epoch
    is trained on once, and the resizes are recorded."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = [*SMALL, f"train.deepspeed={{zero_optimization: {{stage: {stage}}}}}"]
    fixed, elastic = tmp_path / "fixed", tmp_path / "elastic"
    train(2, fixed, "r", *common, "train.max_steps=2")
    shutil.copytree(fixed, elastic)  # the same step-2 checkpoint for both
    train(2, fixed, "r", *common, "train.max_steps=4")
    train(2, fixed, "r", *common, "train.max_steps=6")
    train(1, elastic, "r", *common, "train.max_steps=4")  # 2 -> 1
    train(2, elastic, "r", *common, "train.max_steps=6")  # 1 -> 2

    want, got = run_losses(fixed / "r"), run_losses(elastic / "r")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(
        torch.tensor([got[s] for s in range(1, 7)]),
        torch.tensor([want[s] for s in range(1, 7)]),
        rtol=1e-4,
        atol=1e-5,
    )
    records = [json.loads(x) for x in (elastic / "r" / "metrics.jsonl").read_text().splitlines()]
    resizes = [(r["step"], r["from"], r["to"]) for r in records if r["type"] == "resize"]
    assert resizes == [(2, 2, 1), (4, 1, 2)]
    results = json.loads((elastic / "r" / "results.json").read_text())
    epochs = results["train_data"]["epochs"]
    windows = results["train_data"]["windows"]
    assert epochs[0]["world_sizes"][:2] == [2, 1]
    assert all(e["windows"] == windows for e in epochs[:-1])  # each finished epoch: every window once
    assert json.loads((fixed / "r" / "results.json").read_text())["train_data"]["epochs"][0][
        "world_sizes"
    ] == [2]


def test_a_checkpoint_without_a_plan_resumes_only_at_its_own_worker_count():
    """Checkpoints carry the run's plan (its global batch in lanes): any group size may resume them.
    One from before (no plan in its manifest) planned its steps for its own count: refused at another."""
    from raytag.cluster.checkpoints import CheckpointInfo
    from raytag.trainer.config import ConfigError, load_config
    from raytag.trainer.resume import check_resume
    from tests.helpers import DEMO

    cfg = load_config(DEMO, ["run.name=old"])
    labels = ["O"]

    from raytag.trainer.config import dump_yaml

    stored = {"labels.json": b'["O"]', "config.yaml": dump_yaml(cfg).encode()}

    def read(info, rel):
        return stored.get(rel)

    def info(meta):
        return CheckpointInfo("step-00000004", 4, {}, [], None, "", meta)

    plan = {"lanes": 2, "batch_tokens": 512, "pool_batches": 64}
    check_resume(cfg, info({"world": 2, "plan": plan}), read, labels, "tok", 1)
    check_resume(cfg, info({"world": 1}), read, labels, "tok", 1)
    with pytest.raises(
        ConfigError, match=r"trained with 2 worker\(s\) and this run has 1 .*set scaling.num_workers=2"
    ):
        check_resume(cfg, info({"world": 2}), read, labels, "tok", 1)
