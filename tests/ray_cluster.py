"""A real multi-node Ray cluster on this machine, for tests: ``RayCluster`` and the ``ray_cluster`` fixture.

Each node is its own ``ray start`` (the head with ``--head`` and the dashboard, the others with
``--address``), on free ports, with its own ``--temp-dir`` and its own ``TMPDIR``, so one machine
looks like several to Ray and to the code it runs::

    with RayCluster() as cluster:
        cluster.start_head(num_cpus=2)
        cluster.add_node(num_cpus=2)        # any time later, e.g. while a job waits for it
        subprocess.run([RAY, "job", "submit", "--address", cluster.dashboard_url, ...], env=cluster.env)
        cluster.kill_node(1)                 # SIGKILL, like a lost machine
        cluster.node_ids()                   # alive node ids, as the GCS sees them

A worker that asks for ``{"CPU": 1, "raytag_slot": 1}`` gets a node of its own: every node has
one ``raytag_slot``. ``RayNode.tmpdir``, ``.node_id``, ``.ip`` say what each node's tasks see.

Facts this relies on (Ray 2.60, checked on this machine):

- Node addresses: Ray replaces 127.0.0.1 (and ``localhost``) by the host's outward address (here
  192.0.2.2; ``services.resolve_ip_for_localhost``, which cannot be turned off on Linux for a
  multi-node cluster), but keeps any other loopback address. The head is given 127.0.0.1, so it
  sits on the outward address, the one a driver on this machine looks for; node ``i`` gets
  127.0.0.``i+1``. Every node thus has an address of its own, as on real machines: Ray Train
  derives ``node_rank``, ``local_rank`` and ``local_world_size`` from node addresses (with one
  shared address, two workers on two nodes got ``node_rank`` 0 and local ranks 0 and 1). Ray's
  servers listen on all interfaces, so free ports are probed on 0.0.0.0. Clients use
  ``address`` and ``dashboard_url``, both on 127.0.0.1.
- Worker processes a raylet starts inherit the environment of the ``ray start`` that started
  the node (plus any ``runtime_env`` ``env_vars``), so the ``TMPDIR`` given to ``ray start`` is
  what ``tempfile.gettempdir()`` returns in that node's tasks and actors. No ``runtime_env`` is
  needed; ``tests/test_ray_cluster.py`` checks it.
- ``RAY_ADDRESS`` is set in every node's environment too: Ray code that looks its cluster up
  with ``address="auto"`` (Train v2's ``PlacementGroupCleaner`` does) otherwise finds every GCS
  running on the machine and, with another Ray instance up (other tests, other checkouts),
  fails with "Found multiple active Ray instances".
- Every process of a node stays in one session: each ``ray start`` runs under an anchor (a
  ``sh`` started with ``start_new_session`` that then sleeps, so the session id cannot be reused
  while the node lives), and daemons, agents and workers keep that session (workers call
  ``setpgid``, not ``setsid``). The exceptions are a job's driver and its watcher, which the job
  supervisor starts in new sessions; they inherit the node's environment, so a marker variable
  finds them. A node's processes are: that session, plus processes carrying the node's marker,
  plus descendants of either. (The marker alone is not enough: processes that rename
  themselves, ``ray::IDLE``, ``ray::RuntimeEnvAgent``, may overwrite the environment block
  ``/proc`` shows.) ``ray stop`` is never used: it stops every Ray process of the user.
- ``--min-worker-port=0 --max-worker-port=0``: each worker binds a port the OS picks (what Ray's
  own ``cluster_utils`` does); a fixed range cannot be reserved, and two raylets on one machine
  with the default range hand out the same ports.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).parent / "ray")
SLOT = "raytag_slot"  # one per node: a worker asking for {"CPU": 1, SLOT: 1} gets a node of its own
MARKER_VAR = "RAYTAG_TEST_RAY_NODE"  # <cluster token>/<node index>, in the environment of every node process
START_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 60.0
KILL_TIMEOUT_S = 15.0
# For fault tests, as start_head(env=FAST_FAILURE_DETECTION): the GCS declares a SIGKILLed node dead
# after ~4 s instead of ~15 s (Ray's default health checks: every 3 s, dead after 5 misses).
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# Each node's session leader: runs `ray start` (which exits once the node's daemons run), writes its
# exit status to $1, then sleeps until killed. Alive, it keeps the session id from being reused.
ANCHOR = (
    'rc_file=$1; shift; "$@"; echo $? > "$rc_file.tmp" && mv "$rc_file.tmp" "$rc_file"; exec sleep infinity'
)
# Ray's default object store is 30% of RAM per node; several nodes on one 24 GB machine share /dev/shm.
OBJECT_STORE_BYTES = 512 * 1024**2


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on every interface (Ray's servers listen on all of them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("0.0.0.0", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[3])


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def processes(nodes: Sequence[tuple[int | None, str]]) -> list[set[int]]:
    """Live processes of each node, for ``nodes`` = ``[(session id or None, marker), ...]``.

    A process belongs to a node when it is in the node's session, carries its marker variable
    (``MARKER_VAR=marker``), or descends from such a process. Zombies are left out: they are
    already dead and init reaps them. This process never counts.
    """
    stats: dict[int, tuple[str, int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[0] != "Z":
                stats[int(entry.name)] = stat
    me = os.getpid()
    by_session = {sid: i for i, (sid, _) in enumerate(nodes) if sid is not None}
    markers = [f"{MARKER_VAR}={marker}".encode() for _, marker in nodes]
    owner: dict[int, int] = {}
    for pid, (_, _, sid) in stats.items():
        if pid == me:
            continue
        if sid in by_session:
            owner[pid] = by_session[sid]
            continue
        for i, marker in enumerate(markers):
            if _has_marker(pid, marker):
                owner[pid] = i
                break
    changed = True
    while changed:  # descendants of owned processes, whatever their session or environment
        changed = False
        for pid, (_, ppid, _) in stats.items():
            if pid not in owner and pid != me and ppid in owner:
                owner[pid] = owner[ppid]
                changed = True
    found: list[set[int]] = [set() for _ in nodes]
    for pid, i in owner.items():
        found[i].add(pid)
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill(nodes: Sequence[tuple[int | None, str]], grace_s: float = 0) -> None:
    """Signal the processes of ``nodes`` (SIGTERM and ``grace_s`` to exit, then SIGKILL) until none remain.

    Processes are looked up again on every round: a dying raylet may still start one. Raises
    RuntimeError naming the survivors after KILL_TIMEOUT_S.
    """
    if not nodes:
        return
    if grace_s > 0:
        _signal_all(set().union(*processes(nodes)), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(processes(nodes)):
            time.sleep(0.1)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while True:
        left = set().union(*processes(nodes))
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray processes {sorted(left)} survived SIGKILL for {KILL_TIMEOUT_S:.0f} s")
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.1)


def _wait_for_rc(rc_file: Path, anchor: subprocess.Popen, timeout_s: float) -> int:
    """The exit status of the anchor's ``ray start`` (-1 when it took longer than ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rc_file.exists():
            return int(rc_file.read_text())
        if anchor.poll() is not None:
            return anchor.returncode or -1
        time.sleep(0.1)
    return -1


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return 0


def base_env() -> dict[str, str]:
    """This process's environment for Ray processes and clients: no cluster address, auth off, no usage stats."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


@dataclass
class RayNode:
    """One ``ray start`` of the cluster."""

    index: int  # 0 is the head
    temp_dir: Path  # Ray's --temp-dir: session, logs, sockets
    tmpdir: Path  # TMPDIR of every process the node starts
    session: int  # session id shared by the node's processes (the pid of its anchor)
    marker: str  # value of MARKER_VAR in their environment
    node_id: str  # Ray's node id (hex)
    ip: str  # the address Ray gave the node (its `node:<ip>` resource, Ray Train's node grouping)
    raylet_pid: int
    ports: dict[str, int] = field(default_factory=dict)
    killed: bool = False

    @property
    def owner(self) -> tuple[int | None, str]:
        """What ``processes()`` finds the node's processes by. A killed node's session id is
        left out: with its anchor gone the kernel may hand that number to a stranger's session."""
        return (None if self.killed else self.session), self.marker


class RayCluster:
    """A Ray cluster of ``ray start`` processes on this machine; stops only what it started.

    ``root`` (default: a new folder under /tmp, short because Ray's socket paths must fit in
    107 bytes) holds each node's ``--temp-dir`` and ``TMPDIR``; a root made here is removed by
    ``stop()``. ``env`` is added to every node's environment (``start_head``/``add_node`` take
    more per node). Nodes get ``object_store_bytes`` of object store each.
    """

    def __init__(
        self,
        root: Path | None = None,
        env: Mapping[str, str] | None = None,
        object_store_bytes: int = OBJECT_STORE_BYTES,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp")) if root is None else Path(root)
        self.token = uuid.uuid4().hex[:12]
        self.nodes: list[RayNode] = []
        self.gcs_port = 0
        self.dashboard_port = 0
        self._extra_env = dict(env or {})
        self._object_store_bytes = object_store_bytes
        self._stopped = False

    # -- addresses ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``ray start --address=...``)."""
        self._require_head()
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and job API (``ray job submit --address ...``, ``JobSubmissionClient``)."""
        self._require_head()
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (``ray job submit``, ``ray status``, a driver's ``ray.init()``) of this cluster."""
        env = base_env()
        env["RAY_ADDRESS"] = self.address
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        return env

    def _require_head(self) -> None:
        if not self.nodes:
            raise RuntimeError("the head is not started: call start_head() first")

    # -- starting -------------------------------------------------------------------------

    def start_head(
        self,
        num_cpus: int = 2,
        resources: Mapping[str, float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RayNode:
        """Start the head (GCS, dashboard on 127.0.0.1, a raylet with ``num_cpus`` and one ``raytag_slot``).

        Returns once the dashboard answers. Raises RuntimeError with ``ray start``'s output on failure.
        """
        if self.nodes:
            raise RuntimeError("the head is already started")
        atexit.register(self.stop)
        names = ["port", "dashboard-port", "ray-client-server-port", *self._node_port_names()]
        node = self._start(
            0,
            names,
            ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1"],
            num_cpus,
            resources,
            env,
        )
        self.gcs_port, self.dashboard_port = node.ports["port"], node.ports["dashboard-port"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while _http_status(f"{self.dashboard_url}/api/version") != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the dashboard at {self.dashboard_url} did not answer:\n{self.log_tail(0)}"
                )
            time.sleep(0.2)
        return node

    def add_node(
        self,
        num_cpus: int = 2,
        resources: Mapping[str, float] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RayNode:
        """Start one more node (a raylet with ``num_cpus`` and one ``raytag_slot``) joined to the head.

        Callable at any time, e.g. while a job waits for resources. Returns once the GCS lists the
        node alive. Raises RuntimeError with ``ray start``'s output on failure.
        """
        self._require_head()
        node = self._start(
            len(self.nodes), self._node_port_names(), [f"--address={self.address}"], num_cpus, resources, env
        )
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while node.node_id not in self.node_ids():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node {node.index} did not join in {JOIN_TIMEOUT_S:.0f} s:\n{self.log_tail(node.index)}"
                )
            time.sleep(0.2)
        return node

    @staticmethod
    def _node_port_names() -> list[str]:
        return [
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
        ]

    def _start(
        self,
        index: int,
        port_names: list[str],
        role_args: list[str],
        num_cpus: int,
        resources: Mapping[str, float] | None,
        env: Mapping[str, str] | None,
    ) -> RayNode:
        if self._stopped:
            raise RuntimeError("this cluster was stopped")
        temp_dir, tmpdir = self.root / f"n{index}", self.root / f"n{index}t"
        tmpdir.mkdir(parents=True, exist_ok=True)
        marker = f"{self.token}/{index}"
        ip = "127.0.0.1" if index == 0 else f"127.0.0.{index + 1}"
        log = self.root / f"n{index}.log"
        errors = []
        for _attempt in range(3):  # a chosen port can be taken by someone else before Ray binds it
            shutil.rmtree(temp_dir, ignore_errors=True)
            temp_dir.mkdir(parents=True)
            ports = dict(zip(port_names, free_ports(len(port_names)), strict=True))
            gcs = f"127.0.0.1:{ports['port']}" if index == 0 else self.address
            node_env = {**base_env(), **self._extra_env, **(env or {})}
            node_env.update({"TMPDIR": str(tmpdir), MARKER_VAR: marker, "RAY_ADDRESS": gcs})
            cmd = [
                RAY,
                "start",
                *role_args,
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps({SLOT: 1, **(resources or {})})}",
                f"--object-store-memory={self._object_store_bytes}",
                f"--node-ip-address={ip}",
                f"--temp-dir={temp_dir}",
                "--min-worker-port=0",
                "--max-worker-port=0",
                "--disable-usage-stats",
                *(f"--{name}={port}" for name, port in ports.items()),
            ]
            rc_file = self.root / f"n{index}.rc"
            rc_file.unlink(missing_ok=True)
            with open(log, "ab") as out:
                out.write(f"$ {' '.join(cmd)}\n".encode())
                out.flush()
                anchor = subprocess.Popen(
                    ["/bin/sh", "-c", ANCHOR, "anchor", str(rc_file), *cmd],
                    env=node_env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its session id then marks every process of the node
                )
            node = RayNode(index, temp_dir, tmpdir, anchor.pid, marker, "", "", 0, ports)
            rc = _wait_for_rc(rc_file, anchor, START_TIMEOUT_S)
            raylet = self._raylet_args(node) if rc == 0 else None
            if raylet:
                node.node_id, node.ip = raylet["node_id"], raylet["node_ip_address"]
                node.raylet_pid = int(raylet["pid"])
                self.nodes.append(node)
                return node
            errors.append(f"attempt {_attempt + 1}: ray start exited with {rc}")
            _kill([node.owner])  # whatever this attempt left running, the anchor included
        raise RuntimeError(f"could not start Ray node {index} ({'; '.join(errors)}):\n{self.log_tail(index)}")

    @staticmethod
    def _raylet_args(node: RayNode) -> dict[str, str] | None:
        """The raylet's ``pid`` and its command-line options (``node_id``, ``node_ip_address``, ...); None when none runs."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in processes([node.owner])[0]:
                try:
                    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                if args and args[0].endswith("/raylet"):
                    found = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
                    if "node_id" in found and "node_ip_address" in found:
                        return {**found, "pid": str(pid)}
            time.sleep(0.2)
        return None

    # -- inspecting -----------------------------------------------------------------------

    def node_ids(self) -> list[str]:
        """Ids of the nodes the GCS holds alive (all of this cluster's, via the dashboard's state API)."""
        from ray.util.state import list_nodes

        # Filtered in Python: with a server-side filter the API counts the dead nodes it left out as
        # missing output and raises.
        nodes = list_nodes(address=self.dashboard_url, timeout=10, raise_on_missing_output=False)
        return [n.node_id for n in nodes if n.state == "ALIVE"]

    def pids(self, index: int | None = None) -> set[int]:
        """Live processes of node ``index`` (all nodes when None)."""
        chosen = self.nodes if index is None else [self.nodes[index]]
        return set().union(*processes([n.owner for n in chosen]))

    def log_tail(self, index: int, chars: int = 4000) -> str:
        """The end of node ``index``'s ``ray start`` output."""
        log = self.root / f"n{index}.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"

    # -- stopping -------------------------------------------------------------------------

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of node ``index`` at once, like a machine that vanished; waits until they are gone.

        Killing the head (0) takes the GCS and so the whole cluster down.
        """
        node = self.nodes[index]
        _kill([node.owner])
        node.killed = True

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop every process this cluster started and remove its folders; safe to call twice.

        SIGKILL at once unless ``grace_s`` gives them that long after a SIGTERM: Ray's daemons
        catch SIGTERM and were still draining after 6 s here, and nothing of a test cluster needs a
        clean shutdown (its state lives in its folders; the object store leaves nothing in
        /dev/shm). Never ``ray stop``. Raises RuntimeError naming the pids if any survive SIGKILL.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            _kill([n.owner for n in self.nodes], grace_s=grace_s)
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head and one more node, each with 2 CPUs and one ``raytag_slot``; stopped after the module."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("RayCluster finds its processes in /proc (Linux)")
    with RayCluster() as cluster:
        cluster.start_head()
        cluster.add_node()
        yield cluster
