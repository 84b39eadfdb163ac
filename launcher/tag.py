"""`predict`: one file in this process, or a corpus of parts in this process or on a Ray Data actor
pool (one model replica per actor, on a GPU or on CPUs), each part read, tagged and written by one
actor (trainer/tag_job.py does the work; this module chooses where it runs).

    predict --model M --input in.txt --output out.jsonl              one file, as before
    predict --model M --input s3://docs/ --output s3://tagged/       a corpus, in this process
    predict --model M --input s3://docs/ --output s3://tagged/ --workers 8     on Ray (local or the
                                                                     cluster of `ray job submit`)

A corpus runs on Ray when `--workers` or a `scaling.*` key is given, or under `ray job submit` /
RAY_ADDRESS; otherwise in this process. Both run the same `PartTagger` and write the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from raytag.trainer.config import ScalingConfig, load_config
from raytag.trainer.predict import PredictError
from raytag.trainer.tag import BATCH_TOKENS
from raytag.trainer.tag_job import PartResult, PartTagger, PartTask, Runner, TagJob, TagProgress

log = logging.getLogger("raytag")

_OVERRIDE = re.compile(r"^scaling\.[A-Za-z_.]+=")


def split_overrides(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--input` paths apart from the `scaling.KEY=VALUE` overrides given among or after them."""
    paths = [p for p in inputs if not _OVERRIDE.match(p)]
    return paths, [p for p in inputs if _OVERRIDE.match(p)]


def one_file(inputs: Sequence[str], output: str) -> bool:
    """True for today's one-file predict: one input that is a file (or '-', or an s3:// object named
    whole) and an output that is '-' or a local path that is not a folder (no final '/')."""
    if len(inputs) != 1 or output.startswith("s3://") or output.endswith(("/", os.sep)):
        return False
    if output != "-" and Path(output).is_dir():
        return False
    src = inputs[0]
    if src == "-":
        return True
    if any(c in src for c in "*?["):
        return False
    if src.startswith("s3://"):
        return not src.endswith("/") and Path(src).suffix != ""  # an object named with its extension
    return Path(src).is_file()


def predict_command(args: argparse.Namespace) -> int:
    """Run `predict` as parsed by the command line; returns the exit status."""
    inputs, overrides = split_overrides(args.input)
    if not inputs:
        raise PredictError("--input: no input path given")
    if args.workers is not None and args.workers < 1:
        raise PredictError(f"--workers {args.workers}: expected 1 or more")
    if args.batch_tokens is not None and args.batch_tokens < 16:
        raise PredictError(f"--batch-tokens {args.batch_tokens}: expected 16 or more")
    if one_file(inputs, args.output):
        if args.workers is not None or overrides:
            log.warning("one input file to one output file is one part: tagged in this process, not on Ray")
        return _one_file(args, inputs[0])
    if args.output == "-":
        raise PredictError(
            "a corpus (a folder, glob, prefix or several inputs) is written in parts: give --output a "
            "folder or an s3:// prefix"
        )
    job = TagJob(
        model=_absolute(args.model),
        output=_absolute(args.output),
        input_format=args.format,
        output_format=args.output_format,
        text_field=args.text_field,
        batch_tokens=args.batch_tokens or BATCH_TOKENS,
        skip_bad_parts=args.skip_bad_parts,
    )
    from raytag.trainer.tag_job import summary_line, tag_corpus

    from .dispatch import _ray_cluster_reachable

    on_ray = args.workers is not None or bool(overrides) or _ray_cluster_reachable()
    runner = None
    if on_ray:
        scaling = load_config(None, overrides).scaling
        runner = ray_runner(job, args.workers or scaling.max_workers, scaling)
    summary = tag_corpus([_absolute(p) for p in inputs], job, runner)
    log.info("%s", summary_line(summary))
    return 0


def _one_file(args: argparse.Namespace, src: str) -> int:
    from raytag.trainer.predict import predict
    from raytag.trainer.tag_io import default_output, format_of

    fmt = args.format or format_of(src, None)
    scores = predict(
        args.model,
        src,
        args.output,
        fmt,
        args.batch_tokens,
        args.output_format or default_output(fmt),
        args.text_field,
    )
    if scores:
        log.info(
            "entity F1 %.4f precision %.4f recall %.4f (against the input's tags)",
            scores["f1"],
            scores["precision"],
            scores["recall"],
        )
    return 0


def _absolute(path: str) -> str:
    """Local paths made absolute: Ray actors run in another working directory."""
    if path.startswith("s3://") or path == "-":
        return path
    return str(Path(path).expanduser().resolve())


# ------------------------------------------------------------------------------ Ray Data actors


class TagActor:
    """One model replica on a Ray actor: `PartTagger` loaded once, then one part per call."""

    def __init__(self, job: TagJob) -> None:
        from .cli import _user_errors
        from .logs import setup_logging

        setup_logging()  # the actor's progress lines reach the driver's log (log_to_driver)
        # A model that cannot be loaded is told with the first part, as a result: an error raised
        # here reaches the driver as Ray's ActorDiedError, a traceback around it.
        self.tag: PartTagger | None = None
        self.broken = ""
        try:
            self.tag = PartTagger(job)
        except _user_errors() as e:
            self.broken = str(e)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from .cli import _user_errors

        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        out: dict[str, list[Any]] = {f.name: [] for f in dataclasses.fields(PartResult)}
        out.update(failure=[], user_error=[])
        for row in rows:
            task = PartTask(**{k: _plain(v) for k, v in row.items()})
            # A failure is returned, not raised: Ray Data's wrapper of a raised error keeps only its
            # own message, and the driver should say what went wrong (one line for a user error).
            failure, user_error = self.broken, bool(self.broken)
            result = PartResult(task.index, task.input)
            try:
                if self.tag is not None:
                    result = self.tag(task)
            except _user_errors() as e:
                result, failure, user_error = PartResult(task.index, task.input), f"{task.input}: {e}", True
            except Exception:
                result, failure = PartResult(task.index, task.input), traceback.format_exc()
            for f in dataclasses.fields(PartResult):
                out[f.name].append(getattr(result, f.name))
            out["failure"].append(failure)
            out["user_error"].append(user_error)
        return out


class ActorFailure(RuntimeError):
    """A tagging actor failed with something other than a user error (its traceback in the message)."""


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds."""
    return value.item() if hasattr(value, "item") else value


def _check_paths_fit_cluster(job: TagJob, tasks: Sequence[PartTask]) -> None:
    """On a cluster of several nodes, every path an actor opens must be an s3:// one: a local
    folder is another folder on each node. Raises PredictError naming the first local path."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    local = [p for p in (job.model, job.output, *(t.input for t in tasks)) if not p.startswith("s3://")]
    if local:
        raise PredictError(
            f"{local[0]} is a local path, and the Ray cluster has {len(nodes)} nodes (each would see "
            "its own folder): give the model, inputs and output as s3:// locations"
        )


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of Ray's wrappers (RayTaskError.cause, or the chained cause) that
    survived the trip from the actor; actors return their own errors as results instead."""
    while True:
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            return error
        error = inner


def ray_runner(job: TagJob, workers: int, scaling: ScalingConfig) -> Callable[[TagProgress], Runner]:
    """A runner of the parts on a Ray Data actor pool of `workers` actors (fewer for fewer parts),
    each with `scaling`'s CPUs, GPUs and resources, one part per call; results as parts finish."""

    def make(progress: TagProgress) -> Runner:
        def run(tasks: Sequence[PartTask]) -> Iterator[PartResult]:
            if not tasks:
                return
            import ray
            import ray.data

            from .ray_launcher import WORKER_ENV, connect

            connect()
            _check_paths_fit_cluster(job, tasks)
            ray.data.DataContext.get_current().enable_progress_bars = False  # ours says lines/s and ETA
            gpus = scaling.gpus_per_worker or (1.0 if scaling.use_gpu else 0.0)
            size = max(1, min(workers, len(tasks)))
            log.info(
                "tagging %d part(s) on a Ray Data actor pool of %d actor(s) (%s CPU, %s GPU each)",
                len(tasks),
                size,
                scaling.cpus_per_worker or 1,
                gpus,
            )
            # raytag's own switches (fault injection) travel to the actors, as to Ray Train's workers
            env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
            items = [dataclasses.asdict(t) for t in tasks]
            extra: dict[str, Any] = {}
            if scaling.worker_resources:
                extra["resources"] = scaling.worker_resources
            if env:
                extra["runtime_env"] = {"env_vars": env}
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                TagActor,
                fn_constructor_kwargs={"job": job},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=scaling.cpus_per_worker or 1,
                num_gpus=gpus,
                **extra,
            )
            try:
                for row in ds.iter_rows():
                    values = {k: _plain(v) for k, v in row.items()}
                    failure, user_error = values.pop("failure"), values.pop("user_error")
                    if user_error:
                        raise PredictError(failure)
                    if failure:
                        raise ActorFailure(f"a tagging actor failed:\n{failure}")
                    yield PartResult(**values)
            except ray.exceptions.RayTaskError as e:  # an actor's own error: raised as itself
                raise _root_cause(e) from None

        return run

    return make
