"""Elastic training: a run whose worker group changes size between checkpoints trains on the same
global batches, and its model and optimizer state load at the new size (ZeRO-2 and ZeRO-3: DeepSpeed's
universal checkpoint; ZeRO-0 state holds the whole optimizer).

Two workers are two processes on this machine, each running `train_loop` under one gloo group,
sharing the run folder (as Ray Train's workers do on one node).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import run_losses, submit_job, train_demo, wait_job
from tests.ray_cluster import FAST_FAILURE_DETECTION, SLOT, RayCluster, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

LINEAR = torch.nn.functional.linear

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


@pytest.mark.parametrize("stage", [2, 3, "0-sparse"])
def test_a_group_that_shrinks_and_grows_follows_the_fixed_size_run(tmp_path, monkeypatch, stage):
    """Steps 1-2 on 2 workers, 3-4 on 1, 5-6 on 2 again, each stage resumed from the last one's
    checkpoint (ZeRO state re-partitioned), give the losses of the same run at one size throughout;
    every window of each epoch is trained on once, and the resizes are recorded."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if stage == "0-sparse":  # ZeRO-0 state as it is, with the row-sparse embedding optimizer's
        common = [*SMALL, "train.zero_stage=0", "train.embedding_updates=sparse"]
    else:
        common = [*SMALL, f"train.deepspeed={{zero_optimization: {{stage: {stage}}}}}"]
    # The fixed-size run: one worker over the same 2 lanes a step (the global batches of 2 workers:
    # test_shards, test_ray), stopped where the elastic run resizes, as it is.
    fixed, elastic = tmp_path / "fixed", tmp_path / "elastic"
    for steps in (2, 4, 6):
        train(1, fixed, "r", *common, f"train.max_steps={steps}")
    train(2, elastic, "r", *common, "train.max_steps=2")
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
    ] == [1]
    # ZeRO-3 swapped torch's linear for the process; the in-process runs put it back at their end
    assert torch.nn.functional.linear is LINEAR


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


# ---------------------------------------------------------------------------------------------
# On Ray: two loopback nodes, one worker slot each, S3 storage on the real test server


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head and a second node, one `raytag_slot` each; nodes lost in ~4 s (fast health checks),
    and a worker group whose start cannot succeed (placed on a node Ray has not yet seen gone)
    given up after 20 s instead of 60."""
    env = {**s3_server.aws_env(), **FAST_FAILURE_DETECTION, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    with RayCluster(env=env) as c:
        c.start_head()
        yield c


ELASTIC = [
    "scaling.num_workers=[1,2]",
    f"scaling.worker_resources={{{SLOT}: 1}}",
    "scaling.elastic_resize_interval_s=2",
    "scaling.max_failures=2",
    "data.max_train_samples=300",
    "data.max_eval_samples=40",
    "data.test=null",
    "train.batch_tokens=256",
    "train.log_every=1",
    "train.save_every=4",
    "model.dropout=0.0",
    "train.precision=fp32",
]


def _when(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.2)


def _bucket_keys(aws_env, bucket: str, prefix: str) -> list[str]:
    page = aws_env.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in page.get("Contents", [])]


def _elastic_run(cluster, aws_env, tmp_path, name: str, steps: int, during) -> dict:
    """Submit an elastic [1, 2] run, call `during()` once its first checkpoint is in the bucket,
    wait for the job to succeed; check its data and its F1 against the same run unfaulted (one
    worker in this process over the same 2 lanes a step); return results.json."""
    bucket = aws_env.make_bucket()
    overrides = [*ELASTIC, f"train.max_steps={steps}"]
    job = submit_job(
        cluster.dashboard_url, cluster.env, f"run.storage=s3://{bucket}/runs", f"run.name={name}", *overrides
    )
    prefix = f"runs/{name}/checkpoints/"
    _when(
        lambda: any(k.endswith("MANIFEST.json") for k in _bucket_keys(aws_env, bucket, prefix)),
        300,
        "a checkpoint",
    )
    during()
    status, logs = wait_job(cluster.dashboard_url, job)
    assert status == "SUCCEEDED", logs[-6000:]
    client = aws_env.client()
    results = json.loads(client.get_object(Bucket=bucket, Key=f"runs/{name}/results.json")["Body"].read())
    metrics = client.get_object(Bucket=bucket, Key=f"runs/{name}/metrics.jsonl")["Body"].read().decode()
    resizes = [r for r in map(json.loads, metrics.splitlines()) if r["type"] == "resize"]
    assert resizes, logs[-4000:]
    reference = train_demo(tmp_path, "reference", *overrides)
    assert abs(results["validation"]["f1"] - reference["validation"]["f1"]) < 0.02
    windows = results["train_data"]["windows"]
    for epoch in results["train_data"]["epochs"][:-1]:  # every finished epoch: each window once
        assert epoch["windows"] == windows, results["train_data"]["epochs"]
    assert results["global_steps"] == steps == reference["global_steps"]
    return {**results, "resizes": resizes, "logs": logs}


@pytest.mark.integration
def test_an_elastic_run_goes_on_without_a_lost_node(cluster, aws_env, tmp_path):
    """[1, 2] on two nodes; the second node is killed after the first checkpoint: the run goes on
    with one worker (not waiting for the node) and finishes with every window of each epoch once."""
    if len(cluster.nodes) < 2 or cluster.nodes[-1].killed:
        cluster.add_node()
    lost = len(cluster.nodes) - 1
    out = _elastic_run(cluster, aws_env, tmp_path, "shrink", 40, lambda: cluster.kill_node(lost))
    sizes = [w for e in out["train_data"]["epochs"] for w in e["world_sizes"]]
    assert sizes[0] == 2 and sizes[-1] == 1, out["train_data"]["epochs"]
    assert (out["resizes"][0]["from"], out["resizes"][0]["to"]) == (2, 1)


@pytest.mark.integration
def test_an_elastic_run_grows_when_a_node_comes_back(cluster, aws_env, tmp_path):
    """[1, 2] with one node alive: it starts with one worker; a node joins after the first
    checkpoint and the group grows to two (Ray Train's resize check), then finishes."""
    for i, node in enumerate(cluster.nodes[1:], start=1):
        if not node.killed:
            cluster.kill_node(i)
    _when(lambda: len(cluster.node_ids()) == 1, 60, "one node left")
    out = _elastic_run(cluster, aws_env, tmp_path, "grow", 100, cluster.add_node)
    sizes = [w for e in out["train_data"]["epochs"] for w in e["world_sizes"]]
    assert sizes[0] == 1 and 2 in sizes, out["train_data"]["epochs"]
    assert (out["resizes"][0]["from"], out["resizes"][0]["to"]) == (1, 2)
