"""MLflow tracking (`tracking.mlflow_uri`, or MLFLOW_TRACKING_URI): rank 0 logs the run to one MLflow run.

What goes there: the resolved config as parameters (URL passwords and known secrets masked), every
record of metrics.jsonl as metrics at its step (`outputs.scalars`' names: `train/loss`,
`validation/f1`, ...), the final results (`results/validation/f1`, `results/train_tokens_per_second`,
...), and results.json, the model card and its plots as artifacts (`results.json`, `card/`). A
resumed run continues the same MLflow run: its id travels in the checkpoint (TrainingProgress).

The run's own files stay the record; MLflow gets a copy. A background thread sends it, so a slow or
unreachable server never holds up training: the first failure is one warning, what the server
missed is kept and sent again every RETRY_S seconds (the run's metrics are in metrics.jsonl
anyway), and at the run's end the thread gets CLOSE_WAIT_S seconds to deliver the rest. A URI that
cannot be one is a ConfigError, before training starts. Uses MlflowClient (mlflow-skinny suffices),
imported only when tracking is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, TrackingConfig, mlflow_uri_problem, public_dict
from .outputs import scalars
from .stopping import Preempted

log = logging.getLogger("raytag")

RETRY_S = 30.0  # while the server is unreachable: how often the sender tries again
CLOSE_WAIT_S = 30.0  # at the run's end: how long the sender may take to deliver what is left
# ... after a stop or an error: less, as a stop's grace (run.stop_grace_seconds) is counting down
STOPPED_WAIT_S = 5.0
MAX_PENDING = 200_000  # metric values kept while the server is unreachable (a few tens of MB at most)
# One request, one try of at most 10 s: the sender's own RETRY_S loop retries, not MLflow's client
# (by default 7 retries with backoff, minutes against a server that is down). And no run URL
# printed to stdout at the run's end, past the log's secret filter (a URI's password in it): the
# log line of `_open` names the run instead. A user's setting wins.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
MAX_METRICS, MAX_PARAMS = 1000, 100  # per log_batch request (MLflow's limits)
MAX_PARAM_CHARS = 6000  # MLflow refuses longer parameter values
NOT_PARAMS = ("run.owner",)  # set anew by every job: not a setting of the run
_CLOSE = object()


def resolve(cfg: Config) -> Config:
    """`cfg` with the tracking settings it runs with: tracking.mlflow_uri, else MLFLOW_TRACKING_URI;
    tracking.mlflow_experiment, else MLFLOW_EXPERIMENT_NAME. The driver calls this, so that Ray's
    workers (started with the cluster's environment, not the driver's) track alike.

    Raises ConfigError for a URI that cannot be an MLflow tracking URI, or when tracking is on and
    mlflow is not installed.
    """
    tc = cfg.tracking
    uri = tc.mlflow_uri
    if uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        problem = mlflow_uri_problem(uri)
        if problem:
            raise ConfigError(f"MLFLOW_TRACKING_URI: {problem}")
    if uri is None:
        return cfg
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"tracking.mlflow_uri {uri!r}: mlflow is not installed (pip install 'raytag[mlflow]')"
        )
    experiment = tc.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
    return dataclasses.replace(cfg, tracking=TrackingConfig(mlflow_uri=uri, mlflow_experiment=experiment))


def open_tracking(cfg: Config, where: str, run_id: str | None) -> MlflowLog | None:
    """Rank 0: the MLflow log of this run (None: tracking is off). `where` is the run's location
    (a tag of the MLflow run); `run_id` the MLflow run a resumed run continues (from its checkpoint).

    The run is opened by the log's sender thread (an unreachable server is a warning there).
    Raises ConfigError when MLflow refuses the URI itself (an unknown scheme, a file store MLflow
    no longer opens).
    """
    cfg = resolve(cfg)
    tc = cfg.tracking
    if tc.mlflow_uri is None:
        return None
    from raytag.cluster.secrets import redact

    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    shown = redact(tc.mlflow_uri)
    try:
        client = MlflowClient(tracking_uri=tc.mlflow_uri)
    except Exception as e:  # MlflowException: no tracking store for this URI
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"tracking.mlflow_uri {shown!r}: MLflow cannot open it: {redact(first)}") from None
    return MlflowLog(
        client,
        shown,
        tc.mlflow_experiment,
        cfg.run.name,
        run_id,
        params(cfg),
        {"raytag.run": redact(where)},
    )


def params(cfg: Config) -> dict[str, str]:
    """The config as MLflow parameters: one per leaf, named by its dotted key (`train.learning_rate`,
    `train.deepspeed.zero_optimization.stage`), strings as they are and other values as JSON (`null`,
    `true`, `[1, 2]`, `{}`), URL passwords and known secrets masked, each cut to MLflow's limit."""
    from raytag.cluster.secrets import redact

    out: dict[str, str] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(f"{name}.", value)
            elif name not in NOT_PARAMS:
                text = value if isinstance(value, str) else json.dumps(value)
                out[name] = redact(text)[:MAX_PARAM_CHARS]

    walk("", public_dict(cfg))
    return out


def metric_name(tag: str) -> str:
    """A name MLflow accepts (letters, digits, `_ - . / space`): an evaluation set or entity type
    named with anything else has it replaced by `_`."""
    return re.sub(r"[^\w\-. /]", "_", tag)


def result_metrics(results: dict[str, Any]) -> dict[str, float]:
    """results.json's figures as MLflow metrics: `results/<set>/f1|precision|recall|accuracy|loss`
    for each scored set, and the run's speed and length (`results/train_tokens_per_second`, ...)."""
    out: dict[str, Any] = {}
    for name, res in results.items():
        if isinstance(res, dict) and "f1" in res:
            out.update(
                {f"results/{name}/{k}": res.get(k) for k in ("f1", "precision", "recall", "accuracy", "loss")}
            )
    for k in (
        "train_runtime_seconds",
        "train_tokens_per_second",
        "train_mfu",
        "train_flops",
        "global_steps",
        "best_step",
    ):
        out[f"results/{k}"] = results.get(k)
    return {
        metric_name(k): float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class MlflowLog:
    """One MLflow run, fed from the training thread and sent by a background thread.

    `write(record)` takes a metrics.jsonl record, `results(...)` the final results and files,
    `close(success)` ends the run (FINISHED; KILLED after a stop or an interrupt, which a rerun
    continues; FAILED otherwise). `run_id` is set once the server has opened the run.
    """

    def __init__(
        self,
        client: Any,
        uri: str,
        experiment: str | None,
        run_name: str,
        run_id: str | None,
        params: dict[str, str],
        tags: dict[str, str],
    ):
        self.client, self.uri, self.experiment, self.run_name = client, uri, experiment, run_name
        self.run_id = run_id
        self.params, self.tags = params, tags
        self._inbox: queue.Queue = queue.Queue()
        self._inbox.put(("open",))
        self._retry_at = 0.0  # monotonic time of the next try while the server is down
        self._down: str | None = None  # why the last try failed (None: the server answers)
        self._off = False  # the server refused the run itself: nothing more is sent
        self._stop = threading.Event()  # the run ended and the wait for the sender ran out
        self._left: list[tuple] = []  # what the sender did not deliver by the end
        self._dropped = 0  # metric values not kept: MAX_PENDING were waiting already
        self._thread = threading.Thread(target=self._send, name="raytag-mlflow", daemon=True)
        self._thread.start()

    # ---- the training thread's side: queue and return at once

    def write(self, record: dict[str, Any]) -> None:
        ms = int(1000 * (record.get("time") or time.time()))
        step = int(record.get("step") or 0)
        self._inbox.put(("metrics", [(metric_name(k), v, ms, step) for k, v in scalars(record).items()]))

    def results(self, results: dict[str, Any], step: int, files: dict[str, Path]) -> None:
        """Final figures at `step`, and `files` (artifact path -> file) copied now: the run's working
        folder may be gone by the time the server takes them."""
        ms = int(time.time() * 1000)
        self._inbox.put(("metrics", [(k, v, ms, step) for k, v in result_metrics(results).items()]))
        folder = Path(tempfile.mkdtemp(prefix="raytag-mlflow-"))
        for rel, path in files.items():
            if path.is_file():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, folder / rel)
        self._inbox.put(("artifacts", folder))

    def close(self, success: bool) -> None:
        """End the MLflow run, waiting at most CLOSE_WAIT_S for the sender (STOPPED_WAIT_S after a
        stop or an error); a warning names what the server did not get. Called from `finally`: an
        exception on its way out decides the status."""
        stopped = isinstance(sys.exc_info()[1], (Preempted, KeyboardInterrupt))
        status = "FINISHED" if success else "KILLED" if stopped else "FAILED"
        self._inbox.put(("status", status))
        self._inbox.put((_CLOSE,))
        wait = CLOSE_WAIT_S if success else STOPPED_WAIT_S
        self._thread.join(wait)
        if self._thread.is_alive():
            self._stop.set()  # it ends after the request it is in
            log.warning(
                "MLflow: %s did not take the run's last records within %.0f s; they are in metrics.jsonl "
                "and results.json",
                self.uri,
                wait,
            )
        elif (self._left or self._dropped) and not self._off:
            points = self._dropped + sum(len(op[1]) for op in self._left if op[0] == "metrics")
            log.warning(
                "MLflow: %s did not get %d metric value(s)%s (%s); they are in metrics.jsonl and results.json",
                self.uri,
                points,
                ", the artifacts" if any(op[0] == "artifacts" for op in self._left) else "",
                f"unreachable: {self._down}" if self._down else f"an outage outlasted {MAX_PENDING} values",
            )
        for op in self._left:
            if op[0] == "artifacts":
                shutil.rmtree(op[1], ignore_errors=True)

    # ---- the sender thread

    def _send(self) -> None:
        pending: deque[tuple] = deque()
        waiting = 0  # metric values in `pending`
        closing = False
        while not closing:
            wait = None if not pending else max(0.0, self._retry_at - time.monotonic())
            try:
                items = [self._inbox.get(timeout=wait) if wait != 0.0 else self._inbox.get_nowait()]
            except queue.Empty:
                items = []
            while True:  # everything queued meanwhile: sent together
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item[0] is _CLOSE:
                    closing = True
                elif item[0] == "metrics" and waiting + len(item[1]) > MAX_PENDING:
                    self._dropped += len(item[1])  # a long outage: the newest wait in metrics.jsonl only
                elif not self._off:
                    pending.append(item)
                    waiting += len(item[1]) if item[0] == "metrics" else 0
            if closing or time.monotonic() >= self._retry_at:
                self._deliver(pending)
                waiting = sum(len(op[1]) for op in pending if op[0] == "metrics")
        self._left = list(pending)

    def _deliver(self, pending: deque[tuple]) -> None:
        """Send `pending` in order until done or the server fails (then try again in RETRY_S)."""
        while pending and not self._stop.is_set():
            op = pending[0]
            taken = 1
            try:
                if op[0] == "open":
                    self._open()
                elif op[0] == "metrics":
                    points = list(op[1])
                    while taken < len(pending) and pending[taken][0] == "metrics":
                        if len(points) + len(pending[taken][1]) > MAX_METRICS:
                            break
                        points += pending[taken][1]
                        taken += 1
                    self._log_metrics(points)
                elif op[0] == "artifacts":
                    self.client.log_artifacts(self.run_id, str(op[1]))
                    shutil.rmtree(op[1], ignore_errors=True)
                elif op[0] == "status":
                    self.client.set_terminated(self.run_id, op[1])
            except Exception as e:
                why = _one_line(e)
                if _refused(e):  # the server answered no: trying again would not help
                    if op[0] == "open":
                        log.warning(
                            "MLflow: %s refused to open run %r (%s); the run trains on without MLflow",
                            self.uri,
                            self.run_name,
                            why,
                        )
                        self._off = True
                        pending.clear()
                        return
                    log.warning("MLflow: %s refused %s (%s); skipped", self.uri, op[0], why)
                    for _ in range(taken):
                        pending.popleft()
                    continue
                if self._down is None:
                    log.warning(
                        "MLflow: %s is unreachable (%s); the run trains on, its metrics are in metrics.jsonl, "
                        "and MLflow gets them once it answers (tried every %.0f s)",
                        self.uri,
                        why,
                        RETRY_S,
                    )
                self._down = why
                self._retry_at = time.monotonic() + RETRY_S
                return
            for _ in range(taken):
                pending.popleft()
            if self._down is not None:
                log.info("MLflow: %s answers again; the metrics it missed are sent", self.uri)
                self._down = None

    def _open(self) -> None:
        """Continue run `run_id` (a resume), or start one in the experiment (created if missing)."""
        from mlflow.entities import Param

        client = self.client
        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except Exception as e:
                if not _refused(e):
                    raise
                log.warning(
                    "MLflow: run %s of the checkpoint is not in %s (%s); starting a new MLflow run",
                    self.run_id,
                    self.uri,
                    _one_line(e),
                )
                self.run_id = None
            else:
                client.update_run(self.run_id, status="RUNNING")
                have = run.data.params
                changed = sorted(k for k, v in self.params.items() if k in have and have[k] != v)
                if changed:  # MLflow's parameters cannot change: config.yaml has the new values
                    log.info("MLflow: run %s keeps its first values of %s", self.run_id, ", ".join(changed))
                new = [Param(k, v) for k, v in self.params.items() if k not in have]
                for i in range(0, len(new), MAX_PARAMS):
                    client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS])
                log.info("MLflow: continuing run %s (%r) in %s", self.run_id, self.run_name, self.uri)
                return
        experiment_id = self._experiment_id()
        run = client.create_run(experiment_id, tags=self.tags, run_name=self.run_name)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in self.params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS])
        page = f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        log.info(
            "MLflow: run %r in experiment %r: %s",
            self.run_name,
            self.experiment or "Default",
            page if self.uri.startswith(("http://", "https://")) else f"run {self.run_id} in {self.uri}",
        )

    def _experiment_id(self) -> str:
        name = self.experiment or "Default"
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(self.client.create_experiment(name))
            except Exception as e:  # another sweep trial created it first
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise e from None
        if found.lifecycle_stage != "active":
            raise Refused(f"experiment {name!r} is deleted (restore it, or name another)")
        return str(found.experiment_id)

    def _log_metrics(self, points: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v, ms, step in points])


class Refused(Exception):
    """The server's state refuses the run (a deleted experiment): trying again would not help."""


def _refused(error: BaseException) -> bool:
    """The server answered with a client error (4xx: bad request, not found, forbidden), or Refused:
    permanent. Anything else (no connection, a timeout, 5xx) may pass."""
    if isinstance(error, Refused):
        return True
    status = getattr(error, "get_http_status_code", None)
    try:
        code = int(status()) if callable(status) else 0
    except (TypeError, ValueError):
        code = 0
    return 400 <= code < 500


# The cause inside the client's "API request to ... failed with exception HTTPConnectionPool(...)"
_CAUSE = re.compile(
    r"(Failed to (?:establish|resolve)[^\"]+|Read timed out\.?|Connection to \S+ timed out\.?)"
)


def _one_line(error: BaseException) -> str:
    """The error in a few words: a connection's cause (`[Errno 111] Connection refused`) when it is one."""
    from raytag.cluster.secrets import redact

    text = str(error).strip()
    cause = _CAUSE.search(text)
    if cause:
        return redact(cause.group(1))
    return redact(text.splitlines()[0][:200] if text else type(error).__name__)
