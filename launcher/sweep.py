"""`sweep`: one raytag run per point of a search space, as Ray Tune trials.

    python trainer/main.py sweep --config FILE sweep.train.learning_rate=[1e-5,3e-5,5e-5] \
        sweep.train.seed=[1,2] [--samples N] [key=value ...]

`sweep.KEY=[a,b,c]` is a grid axis; `sweep.KEY=loguniform(1e-5,1e-4)` (also `uniform`, `randint`,
`lograndint`, `choice(a,b,c)`: Ray Tune's distributions) is sampled `--samples` times per grid
point, from a generator seeded by `--seed`, so the same command gives the same points. Trial i is
a normal run named `trial-NNN` under `<run.storage>/<run.name>/` (its own metrics, checkpoints,
model and card); all trials share `<run.storage>/prepared-data`. The sweep's own record,
`<run.storage>/<run.name>/sweep.json`, holds the points and each trial's outcome, and `sweep.md`
the table. Running the same command again reads the trials that finished (their results.json)
instead of training them again, and resumes the others from their checkpoints like any rerun.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import yaml

from raytag.trainer.config import Config, ConfigError, from_dict, load_config, to_dict

log = logging.getLogger("raytag")

METRIC = "validation_f1"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "lograndint", "choice")
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Axis:
    """One swept key: grid values, or a distribution to sample."""

    key: str
    values: tuple[Any, ...] = ()  # grid
    dist: str | None = None  # a Ray Tune distribution's name
    args: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.dist is None:
            return f"{self.key} in {list(self.values)}"
        return f"{self.key} ~ {self.dist}({', '.join(map(str, self.args))})"

    def domain(self):
        from ray import tune

        if self.dist == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, str(self.dist))(*self.args)


def split_args(items: list[str]) -> tuple[list[Axis], list[str]]:
    """`sweep.KEY=SPACE` items as axes; every other item is a plain override. Raises ConfigError."""
    axes: list[Axis] = []
    overrides: list[str] = []
    for item in items:
        if not item.startswith("sweep."):
            overrides.append(item)
            continue
        key, sep, raw = item[len("sweep.") :].partition("=")
        if not sep or not key:
            raise ConfigError(
                f"{item!r}: expected sweep.dotted.key=[v1,v2,...] or sweep.dotted.key=dist(a,b)"
            )
        if any(a.key == key for a in axes):
            raise ConfigError(f"{item!r}: {key} is swept twice")
        axes.append(parse_axis(key, raw, item))
    return axes, overrides


def parse_axis(key: str, raw: str, item: str) -> Axis:
    call = _CALL.match(raw)
    if call:
        name, inner = call.group(1), call.group(2)
        if name not in DISTRIBUTIONS:
            raise ConfigError(f"{item!r}: unknown distribution {name!r} (one of {', '.join(DISTRIBUTIONS)})")
        args = [_number(a) for a in _yaml_list(f"[{inner}]", item)]
        if name != "choice":
            try:
                args = [float(a) for a in args]
            except (TypeError, ValueError):
                raise ConfigError(f"{item!r}: {name} takes two numbers, got {inner!r}") from None
            if len(args) != 2 or not args[0] < args[1]:
                raise ConfigError(f"{item!r}: {name} takes two numbers low < high, got {inner!r}")
            if name.startswith("log") and args[0] <= 0:
                raise ConfigError(f"{item!r}: {name} needs a positive lower bound")
            if name.endswith("randint"):
                args = [int(a) for a in args]
        elif not args:
            raise ConfigError(f"{item!r}: choice needs at least one value")
        return Axis(key, dist=name, args=tuple(args))
    values = _yaml_list(raw, item)
    if not values:
        raise ConfigError(f"{item!r}: the list of values is empty")
    return Axis(key, values=tuple(_number(v) for v in values))


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-5` (no dot) as a string: a number written so is the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        return float(value) if any(c in value for c in ".eE") else int(value)
    return value


def _yaml_list(raw: str, item: str) -> list[Any]:
    try:
        values = yaml.safe_load(raw)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list):
        raise ConfigError(
            f"{item!r}: expected a list [v1,v2,...] or a distribution like loguniform(1e-5,1e-4)"
        )
    return values


def points(axes: list[Axis], samples: int, seed: int) -> list[dict[str, Any]]:
    """The search space's points in a fixed order: each grid point, `samples` times, the sampled
    axes drawn from one generator seeded by `seed`."""
    import numpy as np

    grid = [a for a in axes if a.dist is None]
    sampled = [a for a in axes if a.dist is not None]
    if not sampled and samples != 1:
        raise ConfigError(f"--samples {samples}: only sampled axes (e.g. loguniform(a,b)) take samples")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        for combo in itertools.product(*(a.values for a in grid)):
            point = dict(zip((a.key for a in grid), combo, strict=True))
            for a in sampled:
                value = a.domain().sample(random_state=rng)
                value = value[0] if isinstance(value, list) else value
                point[a.key] = value.item() if hasattr(value, "item") else value
            out.append({a.key: point[a.key] for a in axes})  # in the order given
    return out


def override(key: str, value: Any) -> str:
    """`key=value` that load_config parses back to `value`."""
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


@dataclass
class Trial:
    name: str
    point: dict[str, Any]
    overrides: list[str]
    config: Config
    status: str = "pending"  # pending | finished | failed | stopped (early, by the scheduler)
    result: dict[str, Any] | None = None  # results.json of a finished trial
    error: str | None = None
    last_f1: float | None = None  # a stopped trial's last validation F1, and its step
    last_step: int | None = None

    def row(self) -> dict[str, Any]:
        r = self.result or {}
        return {
            "trial": self.name,
            "overrides": self.overrides,
            "status": self.status,
            "validation_f1": (r.get("validation") or {}).get("f1", self.last_f1),
            "test_f1": (r.get("test") or {}).get("f1"),
            "train_runtime_seconds": r.get("train_runtime_seconds"),
            "global_steps": r.get("global_steps", self.last_step),
            "run": self.config.run.storage.rstrip("/") + "/" + self.config.run.name,
            **({"error": self.error} if self.error else {}),
        }


def plan(
    config_path, items: list[str], samples: int, seed: int | None
) -> tuple[Config, list[Axis], list[Trial]]:
    """The sweep's base config, its axes and one Trial per point (each config validated).

    With MLflow tracking on (tracking.mlflow_uri or MLFLOW_TRACKING_URI), every trial is a run of
    one experiment: tracking.mlflow_experiment, by default the sweep's run.name."""
    from raytag.trainer.tracking import resolve

    axes, overrides = split_args(items)
    if not axes:
        raise ConfigError("sweep: no axis given (add e.g. sweep.train.learning_rate=[1e-5,3e-5,5e-5])")
    base = resolve(load_config(config_path, overrides))
    tracking = base.tracking
    if tracking.mlflow_uri is not None and tracking.mlflow_experiment is None:
        tracking = dataclasses.replace(tracking, mlflow_experiment=base.run.name)
    space = points(axes, samples, base.train.seed if seed is None else seed)
    root = base.run.storage.rstrip("/") + "/" + base.run.name
    prepared = base.data.prepared or base.run.storage.rstrip("/") + "/prepared-data"
    trials = []
    for i, point in enumerate(space):
        name = f"trial-{i:03d}"
        mine = [override(k, v) for k, v in point.items()]
        cfg = load_config(
            config_path,
            [
                *overrides,
                *mine,
                f"run.storage={root}",
                f"run.name={name}",
                "run.new_run=false",  # the sweep starts over itself; a retried trial resumes
                f"data.prepared={prepared}",
            ],
        )
        trials.append(Trial(name, point, mine, dataclasses.replace(cfg, tracking=tracking)))
    return base, axes, trials


# ---------------------------------------------------------------------------------------------
# running


def _trial_main(config: dict[str, Any]) -> None:
    """A Tune trial: one raytag run (in this process, or on Ray Train for several workers)."""
    from ray import tune

    from .logs import setup_logging

    setup_logging()  # the run's log lines, forwarded by Ray to the sweep's console
    cfg = from_dict(config["trial"]["config"])
    t0 = time.monotonic()

    def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
        if "eval_f1" in metrics:  # Tune's view of the run: validation F1 at each evaluation
            tune.report({METRIC: metrics["eval_f1"], "step": metrics["step"]})

    if cfg.scaling.num_workers == 1:
        from raytag.trainer.loop import train_loop

        # A world of one of its own: a process-group address inherited from the node's environment
        # (where a driver's in-process run set it) would be every concurrent trial's, and taken.
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(key, None)
        results = train_loop(to_dict(cfg), report)
    else:
        from .ray_launcher import launch

        results = launch(cfg)
    results = results or {}
    tune.report(
        {
            METRIC: (results.get("validation") or {}).get("f1"),
            "step": results.get("global_steps"),
            "seconds": time.monotonic() - t0,
            "run_finished": True,  # not "done": Tune sets that itself, also on a trial it stopped
        }
    )


def _resources(cfg: Config) -> dict[str, float]:
    sc = cfg.scaling
    if sc.elastic or sc.max_workers > 1:  # the trial only drives Ray Train, whose workers ask for their own
        return {"CPU": 0.01}
    return {"CPU": sc.cpus_per_worker or 1, **({"GPU": 1} if sc.use_gpu else {})}


def run_sweep(
    config_path,
    items: list[str],
    samples: int = 1,
    seed: int | None = None,
    max_concurrent: int | None = None,
    early_stop: bool = False,
) -> dict[str, Any]:
    """Plan, skip finished trials, run the rest on Ray Tune, write sweep.json and sweep.md; return the record."""
    from raytag.cluster.storage import open_storage
    from raytag.trainer.resume import trains_longer

    base, axes, trials = plan(config_path, items, samples, seed)
    rc = base.run
    storage = open_storage(rc.storage, endpoint_url=rc.s3_endpoint_url, region=rc.s3_region)
    storage.preflight(create_bucket=rc.create_bucket)
    record_key = f"{rc.name}/sweep.json"
    if rc.new_run:
        storage.delete_prefix(f"{rc.name}/")
        log.info("sweep %s: started over (run.new_run=true)", storage.display(rc.name))
    earlier = _read_json(storage, record_key)
    if earlier is not None:
        before = [t["overrides"] for t in earlier.get("trials", [])]
        now = [t.overrides for t in trials]
        if before != now:
            raise ConfigError(
                f"sweep {storage.display(rc.name)} exists with other points ({len(before)} trials, first "
                f"{before[:1]}); give another run.name, or run.new_run=true to start it over"
            )
    log.info(
        "sweep %s: %d trial(s) over %s",
        storage.display(rc.name),
        len(trials),
        "; ".join(a.describe() for a in axes),
    )
    stopped = {r["trial"]: r for r in (earlier or {}).get("trials", []) if r["status"] == "stopped"}
    for t in trials:
        if t.name in stopped:  # the scheduler's verdict stands: not trained on
            t.status, t.last_f1, t.last_step = (
                "stopped",
                stopped[t.name]["validation_f1"],
                stopped[t.name]["global_steps"],
            )
            continue
        found = _read_json(storage, f"{rc.name}/{t.name}/results.json")
        if found is not None and trains_longer(t.config, found):
            found = None  # more epochs or steps asked for: the run trains on, as any rerun does
        if found is not None:
            t.status, t.result = "finished", found
            log.info(
                "%s %s: finished earlier (validation F1 %s)",
                t.name,
                " ".join(t.overrides),
                _fmt((found.get("validation") or {}).get("f1")),
            )
    pending = [t for t in trials if t.status == "pending"]
    if pending:
        _prepare(pending)
        _tune(base, pending, max_concurrent, early_stop)
        for t in pending:
            found = _read_json(storage, f"{rc.name}/{t.name}/results.json")
            if found is not None:
                t.status, t.result = "finished", found
            elif t.status == "pending":
                t.status, t.error = "failed", "the run wrote no results.json"
    record = _record(base, axes, trials, samples)
    storage.put_bytes(record_key, (json.dumps(record, indent=2) + "\n").encode())
    storage.put_bytes(f"{rc.name}/sweep.md", table(record).encode())
    return record


def _prepare(trials: list[Trial]) -> None:
    """Prepare each distinct training set once, before the trials start (trials then find it)."""
    from raytag.trainer.shards import spec_from_config

    from .dispatch import prepare_only

    done: list[Any] = []
    for t in trials:
        spec = spec_from_config(t.config)
        if spec not in done:  # trials that sweep no data or window key share one preparation
            prepare_only(t.config)
            done.append(spec)


def _tune(base: Config, trials: list[Trial], max_concurrent: int | None, early_stop: bool) -> None:
    import tempfile

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the sweep prints its own table; no Tune banners
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # the trials' log lines are alike; keep each
    from ray import tune

    from .ray_launcher import connect

    connect()
    by_name = {t.name: t for t in trials}
    trainable = tune.with_resources(_trial_main, _resources(base))
    scheduler = None
    if early_stop:  # ASHA on validation F1 at each evaluation: the lower half stops at each rung
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(grace_period=1, reduction_factor=2, max_t=10**6)
    tuner = tune.Tuner(
        trainable,
        param_space={
            "trial": tune.grid_search([{"name": t.name, "config": to_dict(t.config)} for t in trials])
        },
        tune_config=tune.TuneConfig(
            metric=METRIC if early_stop else None,
            mode="max" if early_stop else None,
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent,
            trial_name_creator=lambda tr: tr.config["trial"]["name"],
            trial_dirname_creator=lambda tr: tr.config["trial"]["name"],
        ),
        run_config=tune.RunConfig(
            name=f"raytag-sweep-{base.run.name}",
            # Tune's own bookkeeping; each trial's outputs are a raytag run in the run's storage
            storage_path=tempfile.mkdtemp(prefix="raytag-tune-"),
            failure_config=tune.FailureConfig(max_failures=base.scaling.max_failures),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    for res in (grid[i] for i in range(len(grid))):
        name = (res.config or {})["trial"]["name"]
        t, metrics = by_name[name], res.metrics or {}
        if res.error is not None:
            lines = [ln for ln in str(res.error).strip().splitlines() if ln.strip()]
            t.status, t.error = "failed", (lines[-1].strip() if lines else type(res.error).__name__)
            log.warning("%s failed: %s", name, t.error)
        elif not metrics.get("run_finished"):
            t.status, t.last_f1, t.last_step = "stopped", metrics.get(METRIC), metrics.get("step")
            log.info(
                "%s stopped early by ASHA at step %s (validation F1 %s)",
                name,
                metrics.get("step"),
                _fmt(t.last_f1),
            )


def _read_json(storage, key: str) -> dict[str, Any] | None:
    raw = storage.get_bytes(key)
    return json.loads(raw) if raw else None


def _record(base: Config, axes: list[Axis], trials: list[Trial], samples: int) -> dict[str, Any]:
    rows = [t.row() for t in trials]
    done = [r for r in rows if r["status"] == "finished" and r["validation_f1"] is not None]
    best = max(done, key=lambda r: r["validation_f1"]) if done else None
    return {
        "sweep": base.run.name,
        "axes": [a.describe() for a in axes],
        "samples": samples,
        "metric": METRIC,
        "best": best["trial"] if best else None,
        "best_run": best["run"] if best else None,
        "trials": rows,
    }


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(record: dict[str, Any]) -> str:
    """The sweep's results as a Markdown table, best first, the best trial named below it."""
    rows = sorted(
        record["trials"],
        key=lambda r: (r["validation_f1"] is None, -(r["validation_f1"] or 0.0), r["trial"]),
    )
    out = [
        f"# Sweep {record['sweep']}: {'; '.join(record['axes'])}",
        "",
        "| trial | config | validation F1 | test F1 | train s | steps | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['trial']} | {' '.join(r['overrides'])} | {_fmt(r['validation_f1'])} | {_fmt(r['test_f1'])} | "
            f"{_fmt(r['train_runtime_seconds'], '.1f')} | {r['global_steps'] if r['global_steps'] is not None else 'n/a'} | "
            f"{r['status']}{': ' + r['error'] if r.get('error') else ''} |"
        )
    out.append("")
    if record["best"]:
        best = next(r for r in rows if r["trial"] == record["best"])
        out.append(f"best: {best['trial']} (validation F1 {_fmt(best['validation_f1'])}): {best['run']}")
    else:
        out.append("best: none (no trial finished)")
    return "\n".join(out) + "\n"
