"""Command line: `python trainer/main.py --config FILE [key=value ...]` and `... predict ...`.

User errors (a bad key, file, value, storage endpoint) end with one line on stderr and exit
status 2; a stop on request (SIGTERM, `ray job stop`) after its checkpoint is uploaded exits 75
(EX_TEMPFAIL: run the same command again); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from raytag.trainer.config import ConfigError, describe_keys, load_config

from .dispatch import prepare_only, run
from .logs import setup_logging

log = logging.getLogger("raytag")

DEMO_CONFIG = "builtin:demo.yaml"

USAGE = """python trainer/main.py [--config FILE] [dotted.key=value ...]
       python trainer/main.py prepare [--config FILE] [--rebuild] [--executor E] [dotted.key=value ...]
       python trainer/main.py predict --model DIR --input PATH [PATH ...] [--format text|jsonl|parquet|conll]
                                      [--output-format entities|parquet|conll] [--output FILE|FOLDER]
                                      [--workers N] [--skip-bad-parts] [scaling.KEY=VALUE ...]
       python trainer/main.py sweep [--config FILE] [--samples N] sweep.KEY=[v1,v2,...] [dotted.key=value ...]
       python trainer/main.py report RUN [--output FILE.html]"""


def _user_errors() -> tuple[type[BaseException], ...]:
    from raytag.cluster.checkpoints import CheckpointUploadError
    from raytag.cluster.storage import StorageError
    from raytag.trainer.conll import ConllError
    from raytag.trainer.predict import PredictError
    from raytag.trainer.report import ReportError
    from raytag.trainer.shards import ShardError

    from .ray_launcher import LaunchError

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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tag text with an exported model: one file into one file, or a corpus (a folder, "
        "glob, s3:// prefix or several of these) into one output part per input part, in this process "
        "or on a Ray Data actor pool (--workers N, or under `ray job submit`). A corpus job killed "
        "and run again skips the parts already written.",
        epilog="--output-format entities writes one JSON object per input line (blank lines included): "
        '{"line": N, "text": LINE, "entities": [{"text", "type", "start", "end", "score"}, ...]};\n'
        "start and end are character offsets into LINE (text == LINE[start:end]), score the mean "
        "probability of the entity's predicted tags.\nJSON Lines and Parquet input: the record's own "
        "fields in place of text (an id goes through). A corpus output holds one part per input part "
        "and MANIFEST.json (the parts and their line counts), written last.\n"
        "Ray placement: scaling.KEY=VALUE among or after the inputs (scaling.cpus_per_worker, "
        "scaling.gpus_per_worker, scaling.use_gpu, scaling.worker_resources, scaling.num_workers "
        "as --workers).",
    )
    p.add_argument(
        "--model", required=True, help="an exported model folder (<run>/model), or an s3:// prefix"
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="files, folders, globs, s3:// prefixes or globs ('-': stdin); one output part per file",
    )
    p.add_argument(
        "--format",
        choices=["text", "jsonl", "parquet", "conll"],
        default=None,
        help="text: one unit a line, split into words as CoNLL writes them (punctuation apart: "
        "'Siemens.' -> 'Siemens' '.'); jsonl: one JSON object a line, the text in --text-field; "
        "parquet: the text in column --text-field; conll: one word a line, a blank line between "
        "sentences (default: from the name: .jsonl/.json/.ndjson, .parquet, else conll)",
    )
    p.add_argument(
        "--text-field", default="text", help="jsonl/parquet: the field holding the text (default text)"
    )
    p.add_argument(
        "--output-format",
        choices=["entities", "parquet", "conll"],
        default=None,
        help="entities: JSON Lines of entities with character offsets (default for text, jsonl, "
        "parquet input); parquet: the same as Parquet; conll: `word [gold] predicted` columns "
        "(default for CoNLL input)",
    )
    p.add_argument(
        "--output",
        default="-",
        help="one input file: a file (default stdout); a corpus: a folder or an s3:// prefix",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="tag on Ray with N actors, one model replica each"
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="padded tokens per forward pass (default 2048; a GPU wants more)",
    )
    p.add_argument(
        "--skip-bad-parts",
        action="store_true",
        help="a part that cannot be read or parsed is listed and skipped (default: the job stops on it)",
    )
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    errors = _user_errors()
    from raytag.cluster.secrets import redact
    from raytag.trainer.stopping import EXIT_PREEMPTED, Preempted

    try:
        if argv and argv[0] == "predict":
            args = predict_parser().parse_args(argv[1:])
            from .tag import predict_command

            return predict_command(args)
        if argv and argv[0] == "report":
            args = report_parser().parse_args(argv[1:])
            from raytag.trainer.report import report

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
            from raytag.trainer.config import dump_yaml

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
