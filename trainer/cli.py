"""Command line: `python trainer/main.py --config FILE [key=value ...]` and `... predict ...`.

User errors (a bad key, file, value, storage endpoint) end with one line on stderr and exit
status 2; a stop on request (SIGTERM, `ray job stop`) after its checkpoint is uploaded exits 75
(EX_TEMPFAIL: run the same command again); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import Config, ConfigError, describe_keys, load_config, to_dict

log = logging.getLogger("raytag")

DEMO_CONFIG = "builtin:demo.yaml"

USAGE = """python trainer/main.py [--config FILE] [dotted.key=value ...]
       python trainer/main.py prepare [--config FILE] [--rebuild] [--executor E] [dotted.key=value ...]
       python trainer/main.py predict --model DIR --input FILE [--format conll|text]
                                      [--output-format conll|entities] [--output FILE]
       python trainer/main.py sweep [--config FILE] [--samples N] sweep.KEY=[v1,v2,...] [dotted.key=value ...]
       python trainer/main.py report RUN [--output FILE.html]"""


def _user_errors() -> tuple[type[BaseException], ...]:
    from raytag.cluster.checkpoints import CheckpointUploadError
    from raytag.cluster.storage import StorageError
    from raytag.launcher.ray_launcher import LaunchError

    from .conll import ConllError
    from .predict import PredictError
    from .report import ReportError
    from .shards import ShardError

    return (
        ConfigError,
        ReportError,
        ConllError,
        StorageError,
        CheckpointUploadError,
        LaunchError,
        ShardError,
        PredictError,
        OSError,  # files and model folders that cannot be read (FileNotFoundError included)
    )


class RedactSecrets(logging.Filter):
    """Strip known secret values (the AWS secret key, session token) from every log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from raytag.cluster.storage import redact

        text = record.getMessage()
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, ()
        return True


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raytag %(levelname)s %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py",
        usage=USAGE,
        description="Fine-tune a Hugging Face encoder (XLM-R by default) for NER on CoNLL files, "
        "in-process or on a Ray cluster, with DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as dotted.key=value):\n" + describe_keys(),
    )
    p.add_argument("--config", help="YAML config file (default: the built-in demo config)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py predict",
        description="Tag text with an exported model.",
        epilog="--output-format entities writes one JSON object per input line (blank lines included): "
        '{"line": N, "text": LINE, "entities": [{"text", "type", "start", "end", "score"}, ...]}; '
        "start and end are character offsets into LINE (text == LINE[start:end]), score the mean "
        "probability of the entity's predicted tags.",
    )
    p.add_argument("--model", required=True, help="an exported model folder (<run>/model)")
    p.add_argument(
        "--input", required=True, help="CoNLL file (1 column, or gold tags last) or text ('-': stdin)"
    )
    p.add_argument(
        "--format",
        choices=["conll", "text"],
        default="conll",
        help="conll: one word per line, blank line between sentences; text: one sentence per line, "
        "split into words as CoNLL writes them (punctuation apart: 'Siemens.' -> 'Siemens' '.')",
    )
    p.add_argument(
        "--output-format",
        choices=["conll", "entities"],
        default="conll",
        help="conll: `word [gold] predicted` columns; entities (with --format text): JSON lines of "
        "entities with character offsets",
    )
    p.add_argument("--output", default="-", help="where to write the output (default stdout)")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One raytag run per point of a search space, as Ray Tune trials (on the cluster of "
        "`ray job submit` / RAY_ADDRESS, or a local Ray). Trial i is the run <run.storage>/<run.name>/"
        "trial-NNN; the table goes to <run.name>/sweep.md and sweep.json, and to stdout. Running the same "
        "command again reads the finished trials instead of training them again.",
        epilog="search space:\n"
        "  sweep.KEY=[a,b,c]            grid values of config key KEY (e.g. sweep.train.learning_rate=[1e-5,3e-5])\n"
        "  sweep.KEY=loguniform(lo,hi)  sampled --samples times per grid point; also uniform, randint,\n"
        "                               lograndint, choice(a,b,...) (Ray Tune's distributions)",
    )
    p.add_argument("--config", help="YAML config file (default: the built-in demo config)")
    p.add_argument(
        "--samples", type=int, default=1, help="draws of the sampled axes per grid point (default 1)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the sampled points (default: train.seed)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: as the cluster's CPUs/GPUs allow)",
    )
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="stop the one-worker trials whose validation F1 falls behind, at each evaluation (Ray Tune's ASHA)",
    )
    p.add_argument("overrides", nargs="*", metavar="sweep.key=SPACE | key=value", help="axes and overrides")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer/main.py report",
        description="Print a run's summary and write one self-contained HTML page: plots, results, "
        "config, provenance and the worst-predicted validation sentences. Works on a run still training.",
    )
    p.add_argument(
        "run", metavar="RUN", help="a run folder (<run.storage>/<run.name>) or s3://bucket/prefix/run-name"
    )
    p.add_argument(
        "--output",
        help="the HTML file (default: <RUN>/report.html for a local run, ./<run-name>-report.html for S3)",
    )
    return p


def resolve_config_path(path: str | None) -> Path:
    if path is None or path == DEMO_CONFIG:
        import importlib.resources

        return Path(str(importlib.resources.files("raytag.trainer") / "assets" / "demo.yaml"))
    return Path(path)


def run(cfg: Config) -> dict | None:
    """Local single-node mode in-process, or a Ray Train run when more workers or a cluster are asked for."""
    from .stopping import on_sigterm

    if cfg.scaling.num_workers == 1 and not _ray_cluster_reachable():
        from .loop import train_loop

        restore = on_sigterm(cfg.run.stop_grace_seconds)  # SIGTERM: checkpoint at the next step, exit 75
        try:
            return train_loop(to_dict(cfg))
        finally:
            restore()
    from raytag.launcher.ray_launcher import launch

    return launch(cfg)  # the driver forwards SIGTERM (`ray job stop`) to its workers


def prepare_only(cfg: Config, rebuild: bool = False, executor: str = "auto") -> str:
    """`prepare`: make (or find) the training shards of `cfg` and return where they are. Under
    `ray job submit` (or RAY_ADDRESS) large inputs are spread over the cluster as Ray tasks;
    `executor` forces one way (inline, processes, ray)."""
    from .model import load_tokenizer
    from .run_data import tokenizer_fingerprint, train_spec
    from .shards import prepare

    parallel = "processes"
    if _ray_cluster_reachable() or executor == "ray":
        from raytag.launcher.ray_launcher import _connect

        _connect()
        parallel = "ray"
    sha = tokenizer_fingerprint(load_tokenizer(cfg.model.name_or_path))
    found = prepare(train_spec(cfg), sha, executor=executor, parallel=parallel, rebuild=rebuild)
    return found.uri


def _ray_cluster_reachable() -> bool:
    """Inside `ray job submit` (or with RAY_ADDRESS set) the run goes through Ray Train."""
    return bool(os.environ.get("RAY_ADDRESS")) or bool(os.environ.get("RAY_JOB_ID"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    errors = _user_errors()
    from raytag.cluster.storage import redact

    from .stopping import EXIT_PREEMPTED, Preempted

    try:
        if argv and argv[0] == "predict":
            args = predict_parser().parse_args(argv[1:])
            from .predict import predict

            scores = predict(
                args.model, args.input, args.output, args.format, output_format=args.output_format
            )
            if scores:
                log.info(
                    "entity F1 %.4f precision %.4f recall %.4f (against the input's tags)",
                    scores["f1"],
                    scores["precision"],
                    scores["recall"],
                )
            return 0
        if argv and argv[0] == "report":
            args = report_parser().parse_args(argv[1:])
            from .report import report

            page, lines = report(args.run, args.output)
            width = max(len(k) for k, _ in lines)
            print("\n".join(f"{k:<{width}}  {v}" for k, v in [*lines, ("report", str(page))]))
            return 0
        if argv and argv[0] == "prepare":
            parser = build_parser()
            parser.prog = "trainer/main.py prepare"
            parser.add_argument("--rebuild", action="store_true", help="prepare again even if found")
            parser.add_argument(
                "--executor",
                choices=["auto", "inline", "processes", "ray"],
                default="auto",
                help="auto: in-process for small inputs, else Ray tasks on a cluster or a process pool",
            )
            args = parser.parse_args(argv[1:])
            cfg = load_config(resolve_config_path(args.config), args.overrides)
            print(prepare_only(cfg, rebuild=args.rebuild, executor=args.executor))
            return 0
        if argv and argv[0] == "sweep":
            args = sweep_parser().parse_intermixed_args(argv[1:])  # options anywhere among the overrides
            from .sweep import run_sweep, table

            record = run_sweep(
                resolve_config_path(args.config),
                args.overrides,
                args.samples,
                args.seed,
                args.max_concurrent,
                args.early_stop,
            )
            sys.stdout.write(table(record))
            return 0 if record["best"] else 1
        args = build_parser().parse_args(argv)
        cfg = load_config(resolve_config_path(args.config), args.overrides)
        if args.print_config:
            from .config import dump_yaml

            sys.stdout.write(dump_yaml(cfg))
            return 0
        run(cfg)
        return 0
    except Preempted as e:  # saved and uploaded: the same command continues
        print(f"raytag: preempted: {redact(str(e).strip())}", file=sys.stderr)
        return EXIT_PREEMPTED
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"raytag: error: {redact(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raytag: interrupted", file=sys.stderr)
        return 130
