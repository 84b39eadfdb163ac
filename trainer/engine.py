"""DeepSpeed set-up: the config dict from a few typed fields, the process group, the engine.

raytag builds the optimizer (torch AdamW, no decay on biases and LayerNorm) and the schedule
(linear warm-up then linear decay, as Hugging Face's recipes) itself and hands both to
DeepSpeed, which owns ZeRO partitioning, precision, accumulation and clipping. That keeps
DeepSpeed's C++ `fused_adam` out of the picture on CPU; a user's extra DeepSpeed JSON can
still replace any key, including `optimizer` and `scheduler`.

The run's choices live here too: its device, ZeRO stage, precision, embedding updates
(`engine_spec`, `fit_embedding_updates`) and attention kernel. The row-sparse optimizer is in
sparse_adam.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import socket
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from . import dist
from .config import Config, ConfigError
from .sparse_adam import RowSparseAdamW, settle_before_lookup, sparse_embedding_table

log = logging.getLogger("raytag")


@dataclass(frozen=True)
class EngineSpec:
    learning_rate: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    total_steps: int
    warmup_steps: int
    zero_stage: int
    precision: str  # resolved: fp32, bf16 or fp16
    accumulation: int
    max_grad_norm: float
    world_size: int
    extra: dict[str, Any]
    on_gpu: bool = False  # bf16 on a CPU is DeepSpeed's torch_autocast (fp32 weights), not its bf16 mode
    sparse_embeddings: bool = False  # row-sparse word-embedding gradients, RowSparseAdamW (ZeRO-0)
    head_lr_scale: float = 1.0  # the classifier head's rate, times learning_rate
    layer_lr_decay: float = 1.0  # each encoder layer's rate, times the one above's

    @property
    def cpu_autocast(self) -> bool:
        """bf16 on a CPU: DeepSpeed's torch_autocast (fp32 weights and optimizer, bf16 matmuls)."""
        return self.precision == "bf16" and not self.on_gpu


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AMX-BF16 or AVX512-BF16).

    On such a CPU a bf16 matmul runs several times faster than fp32 (measured on this project's
    machine: 711 against 126 GFLOP/s for 2048x2048 on 2 threads); elsewhere bf16 is emulated and
    slower than fp32.
    """
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in checks:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:  # a torch built without the probe's support
            continue
    return False


def resolve_precision(requested: str, use_gpu: bool) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on older GPUs; on CPU bf16 where it has AMX or
    AVX512-BF16, else fp32."""
    if requested != "auto":
        if requested == "fp16" and not use_gpu:
            raise ValueError(
                "train.precision: fp16 needs a GPU (DeepSpeed refuses it on CPU); use bf16 or fp32"
            )
        return requested
    if use_gpu:
        # Native bf16 only (compute capability 8.0+): torch's default also counts GPUs that merely
        # emulate it (a V100 or T4 can hold bf16 tensors), where bf16 is slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def rank_device(use_gpu: bool, given: torch.device | None) -> torch.device:
    """The torch device of this rank: `given` (Ray's choice), else cuda:LOCAL_RANK; the CPU without GPUs."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("scaling.use_gpu is true but torch sees no GPU on this worker")
    device = given if given is not None else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def engine_spec(
    cfg: Config,
    world: int,
    total_steps: int,
    on_gpu: bool,
    *,
    planned_world: int | None = None,
    accumulation: int | None = None,
) -> EngineSpec:
    """The DeepSpeed settings this run uses; the one place that decides the ZeRO stage.

    `world` is the group training now; `planned_world` the workers the run was planned for (its
    largest group: an elastic run's MAX), which decides the ZeRO stage and the embedding updates so
    that they do not change when the group resizes; `accumulation` this rank's micro-batches a step
    (default train.gradient_accumulation_steps)."""
    tc = cfg.train
    planned = planned_world or world
    forced_stage = (tc.deepspeed.get("zero_optimization") or {}).get("stage")
    if forced_stage is not None:  # explicit DeepSpeed JSON wins
        zero_stage = int(forced_stage)
    elif planned == 1 and tc.zero_stage in (1, 2):
        # ZeRO-1/2 partition optimizer state and gradients across data-parallel workers; with one
        # worker nothing is partitioned and the flat-buffer copies cost time: a step of the 384-wide
        # offline encoder takes 2.2x as long under ZeRO-2 on CPU (bench/engine_step.py).
        log.info("one worker: ZeRO-%d has nothing to partition, running ZeRO-0", tc.zero_stage)
        zero_stage = 0
    else:
        zero_stage = tc.zero_stage
    sparse = embedding_updates(tc.embedding_updates, zero_stage, planned, on_gpu, "optimizer" in tc.deepspeed)
    return EngineSpec(
        learning_rate=tc.learning_rate,
        weight_decay=tc.weight_decay,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_epsilon,
        total_steps=total_steps,
        warmup_steps=int(round(tc.warmup_ratio * total_steps)),
        zero_stage=zero_stage,
        precision=resolve_precision(tc.precision, on_gpu),
        accumulation=accumulation or tc.gradient_accumulation_steps,
        max_grad_norm=tc.max_grad_norm,
        world_size=world,
        extra=tc.deepspeed,
        on_gpu=on_gpu,
        sparse_embeddings=sparse,
        head_lr_scale=tc.head_lr_scale,
        layer_lr_decay=tc.layer_lr_decay,
    )


def embedding_updates(
    setting: str, zero_stage: int, world: int, on_gpu: bool, own_optimizer: bool = False
) -> bool:
    """train.embedding_updates as "sparse or not" (logged when auto chooses).

    auto is sparse for one CPU worker at ZeRO-0, where it was measured to pay and to keep F1
    (bench/embeddings.py, bench/quality.py: one epoch of 3000 CoNLL-2003 sentences at 4 per step,
    seeds 1 2 3: dev F1 0.819 0.802 0.809 in 72-75 s against dense 0.796 0.807 in 173-178 s; the
    optimizer step 0.02 s against 0.10 s), and dense elsewhere: ZeRO-1/2/3 keep gradients in
    flat partitions with no sparse form, and on a GPU dense fused AdamW is a few milliseconds.
    """
    if setting == "sparse":
        if zero_stage != 0:
            raise ConfigError(
                f"train.embedding_updates=sparse needs ZeRO-0, but this run is at ZeRO-{zero_stage} "
                "(ZeRO-1/2/3 keep gradients in flat partitions with no sparse form): use dense or auto"
            )
        return True
    if setting == "dense":
        return False
    if own_optimizer:
        why, sparse = "train.deepspeed names its own optimizer", False
    elif on_gpu:
        why, sparse = "on a GPU dense AdamW is a few milliseconds a step", False
    elif zero_stage != 0:
        why, sparse = f"ZeRO-{zero_stage} has no sparse gradients", False
    elif world != 1:
        why, sparse = f"{world} workers (measured for one)", False
    else:
        why, sparse = "one CPU worker at ZeRO-0: AdamW over the rows a step touches", True
    log.info("train.embedding_updates=auto: %s (%s)", "sparse" if sparse else "dense", why)
    return sparse


def fit_embedding_updates(spec: EngineSpec, setting: str, model: torch.nn.Module) -> EngineSpec:
    """The spec for this model: auto's sparse updates need an `nn.Embedding` word table."""
    if spec.sparse_embeddings and setting == "auto" and sparse_embedding_table(model) is None:
        log.info("train.embedding_updates=auto: dense after all (the model has no nn.Embedding word table)")
        return dataclasses.replace(spec, sparse_embeddings=False)
    return spec


def attention_kernel(setting: str, spec: EngineSpec) -> str:
    """model.attention as a kernel name: auto is eager for bf16 on CPU, sdpa elsewhere.

    Measured on the offline encoder (2 cores, AVX512-BF16), one step of 42 sentences of 24 tokens
    under bf16 autocast: backward 0.22 s with eager attention against 0.32 s with torch's fused
    CPU attention (its backward alone took 30% of the step); in fp32 the two are even.
    """
    if setting != "auto":
        return setting
    return "eager" if spec.cpu_autocast else "sdpa"


def deepspeed_config(spec: EngineSpec) -> dict[str, Any]:
    """The DeepSpeed JSON, with the user's `train.deepspeed` merged over it (deeply).

    bf16 on a GPU is DeepSpeed's `bf16` mode (bf16 weights, fp32 master copy in the optimizer).
    On a CPU it is DeepSpeed's `torch_autocast` instead: fp32 weights and optimizer, the forward
    under `torch.autocast(bfloat16)` (matmuls in bf16, softmax and LayerNorm in fp32), as the
    Hugging Face Trainer's `--bf16`. Measured on the offline encoder (2 cores, AVX512-BF16), one
    step of 42 sentences: fp32 0.85 s, DeepSpeed's bf16 mode 0.73 s (its optimizer's extra fp32
    copies cost 0.34 s a step), torch_autocast 0.40 s.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # nominal: raytag feeds token-budget batches itself
        "gradient_accumulation_steps": spec.accumulation,
        "train_batch_size": spec.accumulation * spec.world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16" and not spec.cpu_autocast},
        "fp16": {"enabled": spec.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.cpu_autocast:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    # Sparse embedding gradients need no key: ZeRO-0's all-reduce gathers a sparse gradient's rows
    # (DeepSpeed removed the old `sparse_gradients` flag, which compressed dense ones).
    return _merge(cfg, spec.extra)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# The variables `ensure_process_group_env` set itself (not a launcher's), for `end_local_process_group`.
_ENV_SET_HERE: set[str] = set()


def ensure_process_group_env() -> None:
    """One process without a launcher: DeepSpeed needs the torch.distributed env variables."""
    if dist.initialized():
        if "LOCAL_RANK" not in os.environ and torch.distributed.get_world_size() == 1:
            os.environ["LOCAL_RANK"] = "0"  # a group started by hand in this process; DeepSpeed reads it
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(env)
    _ENV_SET_HERE.update(env)


def end_local_process_group() -> None:
    """End the process group a run without a launcher started (DeepSpeed does, in `build_engine`),
    and forget the variables `ensure_process_group_env` set for it: the next run starts afresh.

    torch's rule is one destroy_process_group() per process before it exits. A gloo group left
    to the interpreter's teardown has worker threads that outlive Python and can crash the exit
    of a run that finished (pytorch/pytorch#179291). Call it only for a group this process's
    run started, never for a launcher's (Ray Train's TorchConfig ends its own).
    """
    if dist.initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's references to the groups
    for key in _ENV_SET_HERE:
        os.environ.pop(key, None)
    _ENV_SET_HERE.clear()


def undo_process_wide_patches() -> None:
    """Put back what a ZeRO-3 engine replaced for the whole process: DeepSpeed swaps
    `torch.nn.functional.linear` for its memory-efficient version "until manually reset". A run
    ends with this, so the next run in the same process (a sweep trial, a test) computes as a
    fresh process does: with it left in place, a later bf16 run's losses moved by 1e-3."""
    import sys

    module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    patched = getattr(module, "InsertPostInitMethodToModuleSubClasses", None) if module else None
    original = getattr(patched, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def _skip_cpu_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    On the first process-group start DeepSpeed builds `deepspeed_shm_comm` with g++ (1-2 min on
    a new machine, every new machine). Marking the op incompatible makes DeepSpeed use plain
    gloo collectives, which it falls back to by design on platforms without the op.
    """
    import deepspeed.ops

    if not torch.cuda.is_available() and os.environ.get("RAYTAG_DS_SHM_COMM") != "1":
        # `__compatible_ops__` is computed lazily on first access by compiling a probe for every
        # op (seconds, and linker noise such as "cannot find -laio"); its only reader is the
        # shm-op check, so when it has not been computed yet we set it ourselves.
        ops = vars(deepspeed.ops)
        if "__compatible_ops__" in ops:
            ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
        else:
            ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}


def build_engine(model: torch.nn.Module, spec: EngineSpec, device_rank: int | None = None):
    """Wrap `model` in a DeepSpeed engine with raytag's optimizer and schedule (unless overridden).

    `device_rank`: the CUDA device index this rank trains on. DeepSpeed otherwise takes
    cuda:LOCAL_RANK, which is not the worker's GPU when Ray assigns devices differently.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    ensure_process_group_env()
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _skip_cpu_shm_build()
    ds_config = deepspeed_config(spec)
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        groups = parameter_groups(model, spec)
        # fused: one kernel over all parameters (CPU and CUDA), the fastest torch AdamW.
        adamw = torch.optim.AdamW
        if spec.sparse_embeddings:
            table = sparse_embedding_table(model)
            if table is None:
                raise ValueError("train.embedding_updates=sparse: the model has no nn.Embedding word table")
            table.sparse = True  # its gradient: the touched rows only
            adamw = RowSparseAdamW
        optimizer = adamw(
            groups, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps, fused=spec.precision != "fp16"
        )
        if spec.sparse_embeddings and spec.world_size == 1:
            settle_before_lookup(table, optimizer)  # type: ignore[arg-type]
        if "scheduler" not in ds_config:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, LinearSchedule(spec.warmup_steps, spec.total_steps)
            )
    args = SimpleNamespace(device_rank=device_rank) if device_rank is not None else None
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if spec.world_size == 1 and engine.zero_optimization_stage() == 0:
        # One rank: DeepSpeed's gradient all-reduce is an identity (a sum over one rank, divided
        # by one) that still flattens every gradient into a buffer and copies it back, twice the
        # model's size in memory traffic per optimizer step: with the 118M-parameter offline
        # encoder on CPU, 40% of a small step's time (bench/engine_step.py --allreduce).
        engine.enable_backward_allreduce = False
    if engine.zero_optimization_stage() == 0:
        _clip_fp32_gradients(engine)
    return engine


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def parameter_groups(model: torch.nn.Module, spec: EngineSpec) -> list[dict[str, Any]]:
    """AdamW's parameter groups: weight decay on weight matrices only (not on biases and LayerNorm
    weights), and each parameter's rate as a multiple of the peak (`lr`), from its place in the model.

    The classifier head (the parameters outside the pretrained `base_model`) trains at
    `head_lr_scale`; with `layer_lr_decay` d < 1, encoder layer i of n at d^(n-1-i) (the top layer
    at 1) and the embeddings at d^n; anything else in the base model (a pooler) at 1. The first
    group runs at the peak rate itself: its rate is the one the log and metrics show.
    """
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "") if base is not model else ""
    layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)
    head_scale, decay = spec.head_lr_scale, spec.layer_lr_decay
    if decay != 1 and layers < 1:
        log.warning(
            "train.layer_lr_decay=%g: %s has no config.num_hidden_layers to decay over: every layer at one rate",
            decay,
            type(model).__name__,
        )
        decay = 1.0
    if head_scale != 1 and not prefix:
        log.warning(
            "train.head_lr_scale=%g: %s has no pretrained base_model to tell its head from: one rate for all",
            head_scale,
            type(model).__name__,
        )
        head_scale = 1.0

    def scale(name: str) -> float:
        if prefix and not name.startswith(prefix + "."):
            return head_scale
        if decay == 1:
            return 1.0
        found = _LAYER.search(name)
        if found:
            return decay ** (layers - 1 - min(int(found.group(1)), layers - 1))
        if ".embeddings." in f".{name}":
            return decay**layers
        return 1.0

    buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = not (p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name)
            buckets.setdefault((scale(name), decays), []).append(p)
    # the peak rate's groups first (decayed before not), then by falling rate
    order = sorted(buckets, key=lambda k: (k[0] != 1.0, -k[0], not k[1]))
    return [
        {
            "params": buckets[k],
            "weight_decay": spec.weight_decay if k[1] else 0.0,
            "lr": spec.learning_rate * k[0],
        }
        for k in order
    ]


class LinearSchedule:
    """The learning rate's factor at a step: linear warm-up from 0 over `warmup` steps, then linear
    decay to 0 at step `total`, as Hugging Face's `get_linear_schedule_with_warmup` (the same figures).

    Its plan can be set after the engine is built (`plan_schedule`): train.time_budget fixes the
    step count once the first steps are timed, and a resumed run sets its own plan over the one its
    checkpoint stored. A callable object rather than a function, so that torch's LambdaLR keeps its
    plan (its `__dict__`) in the scheduler's state, in every checkpoint.
    """

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step) / float(max(1, self.warmup))
        return max(0.0, float(self.total - step) / float(max(1, self.total - self.warmup)))


def plan_schedule(engine, warmup: int, total: int, *, rate_now: bool = True) -> bool:
    """Make raytag's schedule warm up over `warmup` steps and reach 0 at step `total`, from the
    engine's next scheduler step on. False when the engine runs another schedule (one from
    `train.deepspeed`) or none.

    `rate_now`: the optimizer's rates are also set at once, to the new plan's at the current step
    (train.time_budget's plan, made mid-run: the next step trains at the plan's rate). Without it the
    next step trains at the rate the optimizer holds: a new run's (the schedule's at step 0), or a
    resumed run's from its checkpoint (the rate its own plan gave that step), as with Hugging Face's
    `get_linear_schedule_with_warmup`, whose plan a checkpoint does not keep: a run resumed to train
    longer takes one step at the old plan's rate (0 where it ended there), then follows the new plan.
    """
    scheduler = getattr(engine, "lr_scheduler", None)
    fns = getattr(scheduler, "lr_lambdas", None)
    if scheduler is None or not fns or not all(isinstance(fn, LinearSchedule) for fn in fns):
        return False
    for fn in fns:
        fn.warmup, fn.total = warmup, total
    if rate_now:
        # What LambdaLR.step() computes: base rate x factor at its step, into the optimizer and _last_lr.
        rates = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, fns, strict=True)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = rates
    return True


def _clip_fp32_gradients(engine) -> None:
    """ZeRO-0 gradient clipping (fp32 weights) that keeps its norm and handles sparse gradients.

    Replaces DeepSpeed's `clip_fp32_gradients`, which drops the norm (`get_global_grad_norm()`
    answers None at ZeRO-0; kept on the optimizer, the engine picks it up after the step, for the
    training log) and cannot scale a sparse gradient (`grad.data.mul_` scales a copy of it). A
    sparse gradient may list a row more than once (ZeRO-0's all-reduce concatenates every rank's
    rows): duplicates are merged first, so the norm is the dense gradient's. After ZeRO-0's
    all-reduce every rank holds the same gradients, so every rank computes the same norm, with no
    collective.
    """
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def clip() -> None:
        norms = []
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
                norms.append(p.grad.values().detach().float().norm(2))
            else:
                norms.append(p.grad.detach().float().norm(2))
        if not norms:
            return
        total = torch.stack(norms).pow(2).sum().sqrt()
        coef = min(1.0, engine.gradient_clipping() / (float(total) + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    g = p.grad
                    p.grad = torch.sparse_coo_tensor(
                        g.indices(), g.values() * coef, g.shape, is_coalesced=True, check_invariants=False
                    )
                else:
                    p.grad.mul_(coef)
        engine.optimizer._global_grad_norm = float(total)

    engine.clip_fp32_gradients = clip


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full-precision weights on CPU, for export (every rank must call it under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    for name, b in module.named_buffers():
        if name in module.state_dict():
            out[name] = b.detach().cpu().clone()
    return out
