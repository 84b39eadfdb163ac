"""Typed run configuration: one frozen dataclass tree, loaded from YAML plus dotted overrides.

    python trainer/main.py --config configs/demo.yaml train.learning_rate=3e-5 run.name=try2

Unknown keys are an error that names the key and the closest valid one; values are checked
against the field's type. Functions below the entry point receive plain values built from
this tree, never the tree itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in the configuration: the message names the file, key or value."""


@dataclass(frozen=True)
class CorpusConfig:
    """One named training corpus of a mixture (`data.train.NAME`)."""

    path: str | list[str] | None = None
    """Its CoNLL files: a path, a folder, a glob, an s3:// prefix or glob, or a list of these."""
    weight: float = 1.0
    """Share drawn each epoch: 0.5 = half of its shards (a fresh draw every epoch), 2 = each shard twice."""


@dataclass(frozen=True)
class ColumnsConfig:
    """Which columns of a dataset input (Parquet, JSON Lines, CSV, save_to_disk, hf:) hold a row's
    words and tags."""

    tokens: str = "tokens"
    """The column of each row's list of words."""
    tags: str = "ner_tags"
    """The column of each row's list of tags: strings, or ids of a ClassLabel named in the features."""


@dataclass(frozen=True)
class DataConfig:
    train: str | list[str] | dict[str, CorpusConfig] | None = None
    """Training data: a file, a folder, a glob (`data/*.conll`), an `s3://bucket/prefix/` or
    `s3://bucket/prefix/*.txt`, a list of these, or named corpora with weights
    (`{en: {path: ..., weight: 1.0}, es: {path: ..., weight: 0.5}}`). `builtin:demo/train.txt`
    names a shipped sample. Files are CoNLL text, or datasets (trainer/tables.py): Parquet,
    JSON Lines, CSV, a `save_to_disk` folder (`PATH` reads its `train` split, `PATH:SPLIT` another)
    or `hf:NAME[:CONFIG][:SPLIT]` from the hub. Prepared once into shards (see `data.prepared`)."""
    validation: str | None = None
    """Evaluated after each epoch: a CoNLL file or a dataset as for `data.train` (local or s3://;
    a save_to_disk folder gives its `validation` split)."""
    test: str | None = None
    """Scored once at the end of the run, with the best checkpoint's weights (results.json `test`,
    predictions/test.txt): a CoNLL file or a dataset, as `data.validation` (split `test`)."""
    eval_sets: dict[str, str] = field(default_factory=dict)
    """Extra named evaluation sets: name -> CoNLL file or dataset (a save_to_disk folder gives the
    split of that name), evaluated with validation."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """The words and tags columns of dataset inputs (defaults as on the hub: tokens, ner_tags)."""
    prepared: str | None = None
    """Where prepared training shards live (a folder or s3://bucket/prefix), shared by runs;
    default: <run.storage>/prepared-data. Each preparation sits in a folder named by its fingerprint."""
    max_train_samples: int | None = None
    """Use the first N training sentences."""
    max_eval_samples: int | None = None
    """Use the first N sentences of each evaluation file."""
    tag_scheme: Literal["auto", "iob1", "iob2"] = "auto"
    """How input tags are written; `auto` decides per file (see trainer/conll.py). Stored as IOB2."""
    strict: bool = False
    """Make a stray I- that starts an entity in IOB2 input an error instead of repairing it to B-."""
    labels: list[str] | None = None
    """The label set; by default taken from the training data."""
    hf_dataset: str | None = None
    """Shorthand for a hub dataset's splits: `conll2003` reads `hf:conll2003:train` for training, and its
    validation and test splits where it has them, for each of those keys left unset. Needs the hub."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "xlm-roberta-base"
    """A local folder or a hub name; `builtin:tiny-xlmr` builds the demo's tiny XLM-R;
    `builtin:xlmr-base-random[:TOKENIZER]` a randomly initialised xlm-roberta-base (for benchmarks)."""
    max_length: int | None = None
    """Window length in tokens (specials included); default: the model's own limit (512 for XLM-R)."""
    stride: int = 64
    """Tokens of context that consecutive windows of a long sentence share."""
    dropout: float | None = None
    """Override the model's hidden dropout probability."""
    attention: Literal["auto", "eager", "sdpa"] = "auto"
    """Attention kernel (transformers' `attn_implementation`). auto: `eager` on CPU with bf16, where
    torch's fused CPU attention backward is slower on NER's short windows; `sdpa` elsewhere."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 3
    """Passes over the training data; a fraction trains part of the last one (the run takes
    ceil(epochs x steps per epoch) optimizer steps). Evaluation runs after each epoch."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (caps the run; the schedule then spans max_steps)."""
    time_budget: str | float | None = None
    """Train for this long: `90s`, `45m`, `2h`, `1h30m`, or a number of seconds. The run times its
    first steps and one evaluation, then fixes its step count so that training and its evaluations
    and checkpoints end inside the budget, the learning-rate schedule ending at that step;
    `train.epochs` then no longer bounds the run (`train.max_steps` still caps it). Data setup and
    the final test scoring and export are outside it. Logged, kept in checkpoints (a resumed run
    keeps its plan and remaining budget) and in results.json's `time_budget`."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW: it rises linearly from 0 over `train.warmup_ratio` of the steps,
    then falls linearly to 0 at the last step."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay, applied to weight matrices (not to biases and LayerNorm weights)."""
    warmup_ratio: float = 0.1
    """Share of the optimizer steps over which the learning rate warms up linearly from 0."""
    head_lr_scale: float = 10.0
    """The new classifier head's learning rate as a multiple of `train.learning_rate` (the head
    starts from random weights; the pretrained encoder below it from a good solution). 1: Hugging
    Face's recipe, one rate for all. Measured (bench/levers.py, full CoNLL-2003, the offline encoder
    at 2e-4, a 251 s budget): dev F1 0.8927 at 1, 0.9164 at 10."""
    layer_lr_decay: float = 0.9
    """Layer-wise learning-rate decay (ELECTRA, BEiT): the encoder's top layer trains at
    `train.learning_rate`, each layer below at this factor times the one above, the embeddings at the
    lowest layer's rate times the factor. 1: every layer at the same rate. Measured as head_lr_scale:
    0.9208 at 0.9 with the head at 10, against 0.9164 at 1."""
    adam_beta1: float = 0.9
    """AdamW's beta1: decay rate of the running mean of gradients (momentum)."""
    adam_beta2: float = 0.999
    """AdamW's beta2: decay rate of the running mean of squared gradients."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon, added to the denominator for numerical stability."""
    batch_tokens: int | Literal["auto"] = "auto"
    """Token budget of one micro-batch per worker, counted with padding (sentences x longest).
    `auto` picks it from the training data (trainer/batching.py, `auto_batch_tokens`): 1024 (about
    43 CoNLL sentences) when the run still gets at least 1000 optimizer steps, else the largest
    budget that does, but never fewer than 4 sentences per optimizer step; below 8 sentences per
    step (small data) batches are random draws of sentences rather than length-grouped. The choice
    is logged."""
    max_batch_sentences: int = 256
    """At most this many sentences (windows) in one micro-batch, whatever `train.batch_tokens` allows."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per worker whose gradients are summed into one optimizer step (DeepSpeed's
    gradient accumulation): a step trains on workers x this many micro-batches."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global L2 norm to this before each step (DeepSpeed's gradient_clipping)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (0-3): across workers, 1 partitions the optimizer state, 2 the gradients
    too, 3 the parameters too. With one worker, 1 and 2 have nothing to partition and run as ZeRO-0.
    A `zero_optimization.stage` in `train.deepspeed` wins."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs that support it, else fp16 on GPU; on CPU bf16 where it has AMX or
    AVX512-BF16 (as autocast: fp32 weights and optimizer, bf16 matmuls), else fp32."""
    embedding_updates: Literal["auto", "dense", "sparse"] = "auto"
    """How the word-embedding table learns. sparse: its gradient holds the rows a step touched and
    AdamW updates those rows, each catching up on the momentum steps it missed (RowSparseAdamW in
    trainer/sparse_adam.py), instead of reading and writing the whole table (XLM-R: 192M of 278M
    parameters) every step; needs ZeRO-0. auto (logged): sparse for one CPU worker (which runs
    ZeRO-0), dense on GPUs, under ZeRO-1/2/3 and with several workers. Measured on CPU
    (bench/embeddings.py, bench/quality.py): the optimizer step 0.02 s against 0.10 s, and one epoch
    of 3000 CoNLL-2003 sentences at dev F1 0.819/0.802/0.809 (seeds 1-3) in 72-75 s against dense
    0.796/0.807 (seeds 1, 3) in 173-178 s."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed JSON merged over the generated config (any DeepSpeed key)."""
    seed: int = 42
    """Seeds the model's initialisation (the new classifier head; every weight of a built-in random
    model), the order of the training data and dropout."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    save_every: int | None = None
    """Also checkpoint every N optimizer steps (checkpoints are always written after each evaluation)."""
    save_every_minutes: float | None = None
    """Also checkpoint when this many minutes have passed since the last checkpoint (rank 0's clock
    decides, at a step boundary): a long epoch on a spot node never risks more than N minutes of work."""
    eval_every: int | None = None
    """Also evaluate every N optimizer steps (evaluation always runs after each epoch)."""
    eval_batch_tokens: int = 16384
    """Token budget of one evaluation batch, counted with padding: larger is faster while memory lasts."""
    threads: int | None = None
    """torch intra-op threads on CPU; default: torch's choice."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "raytag-run"
    """The run's name: its outputs and checkpoints go to <run.storage>/<run.name>/, and running the
    same name again resumes it (see `run.resume`, `run.new_run`)."""
    storage: str = "runs"
    """Local folder or s3://bucket/prefix; outputs go to <storage>/<name>/."""
    keep_best: int = 1
    """Checkpoints kept besides the latest: the best k by validation F1 (at least 1: test and model/ use the best)."""
    resume: bool = True
    """Resume from the newest complete checkpoint of the same run name, if any."""
    new_run: bool = False
    """Start over even if the run already has checkpoints or finished (old checkpoints are removed)."""
    s3_endpoint_url: str | None = None
    """S3 endpoint (MinIO, ...); default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS."""
    s3_region: str | None = None
    """S3 region; default: boto3's own (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config)."""
    create_bucket: bool = False
    """Create the bucket in the pre-flight check when it does not exist."""
    staging_dir: str | None = None
    """Node-local working folder of a bucket run (default: $TMPDIR/raytag-staging); holds at most the
    newest checkpoint and the files being uploaded."""
    storage_retry_seconds: float = 120
    """How long an upload to the run's storage is retried through an outage (connection refused,
    timeouts, 5xx) before the run ends with one line naming the checkpoint or file; training goes on
    meanwhile. The run then resumes from its last complete checkpoint when rerun."""
    stop_grace_seconds: float = 25
    """After SIGTERM (spot reclaim, Kubernetes, `ray job stop`), the time raytag may take to save a
    checkpoint at the next step boundary and finish its upload before it exits anyway (status 75);
    if that runs out, the last complete checkpoint stands. Keep it under the platform's notice
    (Kubernetes: terminationGracePeriodSeconds, 30 s by default; Ray jobs: RAY_JOB_STOP_WAIT_TIME_S)."""
    tensorboard: bool = True
    """Write TensorBoard event files of the metrics to <run>/tensorboard/ (rank 0), synced with the
    run's other files: `tensorboard --logdir <run.storage>/<run.name>/tensorboard` (s3:// too)."""
    owner: str | None = None
    """Set automatically: the id of the job writing the run (a second live job is refused)."""


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int | list[int] = 1
    """Data-parallel workers, one DeepSpeed process each (on GPUs, one per GPU). 1 trains in this
    process unless under `ray job submit` or RAY_ADDRESS; more run as a Ray Train worker group.
    [MIN, MAX] (e.g. [2, 8]) is an elastic group on Ray Train: it starts once MIN workers can be
    placed, shrinks when workers or nodes are lost, and grows back to MAX when capacity returns; the
    global batch and the schedule are planned for MAX, so the results do not depend on the size."""
    elastic_resize_interval_s: float = 60.0
    """Elastic runs: how often Ray Train checks whether more workers can be placed (and the group grows)."""
    use_gpu: bool = False
    """Train on GPUs, one per worker; a worker that sees no GPU is an error."""
    cpus_per_worker: float | None = None
    """CPUs Ray reserves for each worker (default 1)."""
    gpus_per_worker: float | None = None
    """GPUs per worker: 1 (the default with use_gpu). Each worker is one data-parallel DeepSpeed process
    on one GPU; more GPUs means more workers."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources each worker asks for (e.g. a custom node resource, or accelerator_type:H100)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes: PACK (on as few nodes as it can), SPREAD (on as many),
    STRICT_PACK (all on one node), STRICT_SPREAD (each on its own node)."""
    max_failures: int = 3
    """Ray restarts the worker group this many times after a lost worker or node."""

    @property
    def elastic(self) -> bool:
        """A [MIN, MAX] range of workers (Ray Train's elastic group)."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def workers(self) -> str:
        """The worker count as logs and the model card say it: `2`, or `1 to 4 (elastic)`."""
        return (
            f"{self.min_workers} to {self.max_workers} (elastic)" if self.elastic else str(self.num_workers)
        )

    @property
    def max_workers(self) -> int:
        """The largest group: the run's global batch is planned for it."""
        return self.num_workers[-1] if isinstance(self.num_workers, list) else self.num_workers


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str | None = None
    """MLflow tracking server (http://HOST:5000, https://..., databricks, sqlite:///FILE.db): rank 0
    logs the config as parameters, the training and evaluation metrics per logged step, the final
    results, and results.json, the model card and its plots as artifacts (trainer/tracking.py). An
    unreachable server is a warning and the run trains on. Default: MLFLOW_TRACKING_URI, else off."""
    mlflow_experiment: str | None = None
    """The MLflow experiment of the run (created when missing); default: MLFLOW_EXPERIMENT_NAME, else
    MLflow's `Default`. A sweep's trials all go to this one, by default named for the sweep's run.name."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load YAML (or defaults when `path` is None) and apply `key=value` overrides.

    Raises ConfigError naming the file, key or value on any problem.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config file: {e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return from_dict(tree, source=source)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from a nested dict (as read from YAML)."""
    return typing.cast(Config, _build(Config, tree, prefix="", source=source))


def _build(cls: type, values: Any, prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            full = f"{prefix}{key}"
            candidates = [f"{prefix}{n}" for n in fields]
            if not prefix:
                candidates += [f"{s}.{f.name}" for s in fields for f in dataclasses.fields(hints[s])]
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(typing.cast(type, hint_type), value or {}, f"{prefix}{key}.", source)
        else:
            kwargs[key] = _check(value, hint_type, f"{prefix}{key}", source)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: {e}") from None
    _validate(obj, prefix, source)
    return obj


def _check(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
                # A mapping or list of the right shape but a bad member: that member's error says most.
                if typing.get_origin(arg) in (dict, list) and isinstance(value, typing.get_origin(arg)):
                    raise
        if len(errors) == 1:
            raise errors[0]
        expected = " or ".join(_describe_type(a) for a in args if a is not type(None))
        raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return {str(k): _check(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, f"{key}.", source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")  # pragma: no cover


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if typing.get_origin(tp) is list:
        return "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return names.get(tp, str(tp))


def _validate(obj: Any, prefix: str, source: str) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {prefix}{key}: {why}")

    if isinstance(obj, TrainConfig):
        if obj.epochs <= 0:
            raise bad("epochs", f"must be > 0, got {obj.epochs}")
        if obj.max_steps is not None and obj.max_steps <= 0:
            raise bad("max_steps", f"must be > 0, got {obj.max_steps}")
        if obj.time_budget is not None:
            try:
                parse_duration(obj.time_budget)
            except ValueError as e:
                raise bad("time_budget", str(e)) from None
            for k in ("scheduler", "optimizer"):
                if k in obj.deepspeed:  # raytag then builds no schedule: nothing would end at the budget
                    raise bad(
                        "time_budget",
                        f"plans raytag's learning-rate schedule to end at its last step, but train.deepspeed."
                        f"{k} replaces {'it' if k == 'scheduler' else 'the optimizer it runs on'}: "
                        "drop one of the two",
                    )
        if obj.learning_rate <= 0:
            raise bad("learning_rate", f"must be > 0, got {obj.learning_rate}")
        if not 0 <= obj.warmup_ratio < 1:
            raise bad("warmup_ratio", f"must be in [0, 1), got {obj.warmup_ratio}")
        if obj.head_lr_scale <= 0:
            raise bad("head_lr_scale", f"must be > 0, got {obj.head_lr_scale}")
        if not 0 < obj.layer_lr_decay <= 1:
            raise bad("layer_lr_decay", f"must be in (0, 1], got {obj.layer_lr_decay}")
        for k in ("head_lr_scale", "layer_lr_decay"):
            if getattr(obj, k) != 1 and "optimizer" in obj.deepspeed:
                raise bad(
                    k,
                    "sets raytag's AdamW parameter groups, but train.deepspeed.optimizer replaces that optimizer "
                    "(set train.head_lr_scale=1 and train.layer_lr_decay=1 to use it)",
                )
        if isinstance(obj.batch_tokens, int) and obj.batch_tokens < 16:
            raise bad("batch_tokens", f"must be at least 16, got {obj.batch_tokens}")
        if obj.gradient_accumulation_steps < 1:
            raise bad("gradient_accumulation_steps", "must be >= 1")
        if obj.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", f"must be 0, 1, 2 or 3, got {obj.zero_stage}")
        for k in ("log_every", "save_every", "eval_every"):
            v = getattr(obj, k)
            if v is not None and v < 1:
                raise bad(k, f"must be >= 1, got {v}")
        if obj.save_every_minutes is not None and not obj.save_every_minutes > 0:
            raise bad("save_every_minutes", f"must be > 0, got {obj.save_every_minutes}")
    elif isinstance(obj, CorpusConfig):
        if not obj.path:
            raise bad("path", "every corpus needs a path (a file, folder, glob or s3:// prefix)")
        if obj.weight <= 0:
            raise bad("weight", f"must be > 0, got {obj.weight}")
    elif isinstance(obj, DataConfig):
        if isinstance(obj.train, list) and not obj.train:
            raise bad("train", "the list of training paths is empty")
        for k in ("max_train_samples", "max_eval_samples"):
            v = getattr(obj, k)
            if v is not None and v < 1:
                raise bad(k, f"must be >= 1, got {v}")
    elif isinstance(obj, ModelConfig):
        if obj.max_length is not None and obj.max_length < 8:
            raise bad("max_length", f"must be at least 8, got {obj.max_length}")
        if obj.stride < 0:
            raise bad("stride", f"must be >= 0, got {obj.stride}")
    elif isinstance(obj, RunConfig):
        if not obj.name or "/" in obj.name or obj.name in (".", ".."):
            raise bad("name", f"must be a plain name without '/', got {obj.name!r}")
        if obj.keep_best < 0:
            raise bad("keep_best", "must be >= 0")
        if not obj.storage_retry_seconds > 0:
            raise bad("storage_retry_seconds", f"must be > 0, got {obj.storage_retry_seconds}")
        if not obj.stop_grace_seconds > 0:
            raise bad("stop_grace_seconds", f"must be > 0, got {obj.stop_grace_seconds}")
    elif isinstance(obj, TrackingConfig):
        problem = mlflow_uri_problem(obj.mlflow_uri) if obj.mlflow_uri is not None else None
        if problem:
            raise bad("mlflow_uri", problem)
        if obj.mlflow_experiment is not None and not obj.mlflow_experiment.strip():
            raise bad("mlflow_experiment", "must not be empty (leave it out for the default)")
    elif isinstance(obj, ScalingConfig):
        if isinstance(obj.num_workers, list):
            if len(obj.num_workers) != 2:
                raise bad("num_workers", f"a range is [MIN, MAX], got {obj.num_workers}")
            low, high = obj.num_workers
            if low < 1:
                raise bad("num_workers", f"MIN must be >= 1, got {obj.num_workers}")
            if low > high:
                raise bad("num_workers", f"MIN must not exceed MAX, got {obj.num_workers}")
        elif obj.num_workers < 1:
            raise bad("num_workers", f"must be >= 1, got {obj.num_workers}")
        if not obj.elastic_resize_interval_s > 0:
            raise bad("elastic_resize_interval_s", f"must be > 0, got {obj.elastic_resize_interval_s}")
        if obj.gpus_per_worker is not None and obj.gpus_per_worker != 1:
            raise bad(
                "gpus_per_worker",
                f"must be 1, got {obj.gpus_per_worker}: each worker trains on one GPU (a data-parallel "
                "DeepSpeed process; NCCL refuses two workers on one GPU); use scaling.num_workers for more GPUs",
            )


# Tracking stores MLflow itself knows (mlflow/tracking/_tracking_service/utils.py; "" and file: a
# local folder); a plugin adds its scheme as an entry point. A database URI may name its driver:
# postgresql+psycopg2://...
MLFLOW_SCHEMES = (
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "file",
    "",
)


def mlflow_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot be an MLflow tracking URI, judged from its form alone (None: it can be).

    No import of mlflow and no connection: the config is checked before anything starts."""
    import importlib.metadata
    import re
    import urllib.parse

    if not uri or any(c.isspace() for c in uri):
        return f"{uri!r} is not a URI (empty, or with spaces)"
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):  # localhost:5000, 127.0.0.1:5000
        return f"{uri!r} has no scheme; did you mean 'http://{uri}'?"
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            return f"{uri!r} has a port that is not a number"
        return None if parts.hostname else f"{uri!r} names no host"
    plugins = {e.name for e in importlib.metadata.entry_points(group="mlflow.tracking_store")}
    if scheme.split("+")[0] in MLFLOW_SCHEMES or scheme in plugins:
        return None
    return (
        f"unsupported scheme {parts.scheme!r} in {uri!r}: use http://HOST:PORT "
        "or https://... (an MLflow server), databricks, or a database (sqlite:///FILE.db, postgresql://...)"
    )


_DURATION = re.compile(r"(?:(?P<h>[0-9.]+)h)?(?:(?P<m>[0-9.]+)m)?(?:(?P<s>[0-9.]+)s)?")


def parse_duration(value: str | float) -> float:
    """The seconds of a duration: a number of seconds, or hours, minutes and seconds in that order
    (`90s`, `45m`, `2h`, `1h30m`, `1.5h`). Raises ValueError for anything else and for a duration
    that is not a finite number > 0."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        parts = match.groupdict() if match and text else {}
        try:
            seconds = sum(
                float(v) * unit for k, unit in (("h", 3600), ("m", 60), ("s", 1)) if (v := parts.get(k))
            )
        except ValueError:  # '1.2.3m'
            parts = {}
        if not any(parts.values()):
            raise ValueError(
                f"expected a duration such as 90s, 45m, 2h or 1h30m, or a number of seconds, got {value!r}"
            ) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a duration > 0, got {value!r}")
    return seconds


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML output, Ray's train_loop_config, provenance)."""
    return dataclasses.asdict(cfg)


def public_dict(cfg: Config) -> dict[str, Any]:
    """`to_dict` with the password of any URL in it masked (`user:***@host`): what the run writes
    down (config.yaml, results.json's provenance, MLflow's parameters)."""
    from raytag.cluster.secrets import redact_urls

    def mask(v: Any) -> Any:
        if isinstance(v, str):
            return redact_urls(v)
        if isinstance(v, dict):
            return {k: mask(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mask(x) for x in v]
        return v

    return typing.cast(dict[str, Any], mask(to_dict(cfg)))


def dump_yaml(cfg: Config) -> str:
    """The config as YAML, any URL's password masked (config.yaml, --print-config)."""
    return yaml.safe_dump(public_dict(cfg), sort_keys=False, allow_unicode=True)


def _keys() -> list[tuple[str, type, dataclasses.Field]]:
    """Every dotted key with the section class and the field that define it, in file order."""
    hints = typing.get_type_hints(Config)
    return [
        (f"{section.name}.{f.name}", hints[section.name], f)
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(hints[section.name])
    ]


def key_docs() -> dict[str, str]:
    """What each key means: the docstring under its field in this file, as one line of text.

    Read from the source with `ast` (Python keeps no attribute docstrings at run time); a key
    without a docstring is absent (tests/test_cli.py checks that none is), and all are when the
    source is not installed.
    """
    import ast
    import inspect
    import sys

    try:
        source = inspect.getsource(sys.modules[__name__])
    except (OSError, TypeError):  # a compiled-only install: --help then shows defaults alone
        return {}
    by_class: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs = by_class.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    found = {key: by_class.get(cls.__name__, {}).get(f.name, "") for key, cls, f in _keys()}
    return {key: doc for key, doc in found.items() if doc}


def describe_keys(width: int | None = None) -> str:
    """Every key with its default and, under it, what it means, wrapped to `width` columns
    (default: the terminal's, as argparse wraps, at most 100), for --help."""
    import shutil
    import textwrap

    if width is None:
        width = min(shutil.get_terminal_size().columns - 2, 100)
    width = max(width, 40)
    docs = key_docs()
    lines: list[str] = []
    section = ""
    for key, _, f in _keys():
        if key.split(".")[0] != section and section:
            lines.append("")
        section = key.split(".")[0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        lines.append(f"  {key} = {default!r}")
        if key in docs:
            lines += textwrap.wrap(
                docs[key], width, initial_indent=" " * 6, subsequent_indent=" " * 6, break_on_hyphens=False
            )
    return "\n".join(lines)
