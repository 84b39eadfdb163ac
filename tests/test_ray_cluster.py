"""The ``ray_cluster`` fixture is a real multi-node Ray cluster: nodes of their own, one slot each, TMPDIR per node.

One cluster (head + one node, about 15 s to start here) serves every test; they run in order,
and the last two add a node and kill it.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from tests.ray_cluster import SLOT, RayCluster

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def driver(ray_cluster: RayCluster):
    """This process as a Ray driver of the cluster (disconnected after the module)."""
    import ray

    ray.init(address=ray_cluster.address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _where() -> tuple[str, str, str | None]:
    import ray

    return ray.get_runtime_context().get_node_id(), tempfile.gettempdir(), os.environ.get("TMPDIR")


def _meet_and_tell(ray, count: int, timeout_s: float = 60.0) -> list[tuple[str, str, str | None]]:
    """Run ``count`` one-slot tasks that each wait until all have started: they must run at the same time."""

    @ray.remote(num_cpus=0)
    class Meeting:
        def __init__(self) -> None:
            self.arrived = 0

        def arrive(self) -> None:
            self.arrived += 1

        def everyone(self) -> bool:
            return self.arrived >= count

    @ray.remote(num_cpus=1, resources={SLOT: 1})
    def slot_task(meeting):
        meeting.arrive.remote()
        deadline = time.monotonic() + timeout_s
        while not ray.get(meeting.everyone.remote()):
            if time.monotonic() > deadline:
                raise TimeoutError("the other slot tasks never started alongside this one")
            time.sleep(0.05)
        return _where()

    meeting = Meeting.remote()  # type: ignore[attr-defined]
    return ray.get([slot_task.remote(meeting) for _ in range(count)], timeout=timeout_s + 60)


def test_two_nodes_with_addresses_and_temp_dirs_of_their_own(ray_cluster: RayCluster):
    head, node = ray_cluster.nodes
    assert sorted(ray_cluster.node_ids()) == sorted([head.node_id, node.node_id])
    assert head.ip != node.ip and node.ip == "127.0.0.2"  # Ray Train groups workers into nodes by address
    assert head.tmpdir != node.tmpdir and head.temp_dir != node.temp_dir
    assert ray_cluster.pids(0) and ray_cluster.pids(1) and not ray_cluster.pids(0) & ray_cluster.pids(1)


def test_one_slot_task_per_node_each_with_its_nodes_tmpdir(ray_cluster: RayCluster, driver):
    placed = _meet_and_tell(driver, 2)
    tmpdir_of = {n.node_id: str(n.tmpdir) for n in ray_cluster.nodes}
    assert sorted(node_id for node_id, _, _ in placed) == sorted(tmpdir_of)
    for node_id, gettempdir, env_tmpdir in placed:
        assert gettempdir == env_tmpdir == tmpdir_of[node_id]
    assert tempfile.gettempdir() not in tmpdir_of.values()  # not merely this process's TMPDIR


def test_a_node_added_later_joins_and_runs_work(ray_cluster: RayCluster, driver):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    late = ray_cluster.add_node()
    assert late.node_id in ray_cluster.node_ids() and len(ray_cluster.node_ids()) == 3
    pinned = driver.remote(_where).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(late.node_id, soft=False)
    )
    assert driver.get(pinned.remote(), timeout=60) == (late.node_id, str(late.tmpdir), str(late.tmpdir))
    placed = _meet_and_tell(driver, 3)
    assert sorted(node_id for node_id, _, _ in placed) == sorted(n.node_id for n in ray_cluster.nodes)


def test_kill_node_takes_down_that_node_only(ray_cluster: RayCluster):
    head, node, late = ray_cluster.nodes
    ray_cluster.kill_node(2)
    assert ray_cluster.pids(2) == set() and late.killed
    # The others run on; the GCS notices the lost node only after its health checks fail (~15 s).
    assert {head.raylet_pid, node.raylet_pid} <= ray_cluster.pids()
    assert {head.node_id, node.node_id} <= set(ray_cluster.node_ids())
