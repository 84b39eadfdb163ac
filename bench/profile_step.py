#!/usr/bin/env python3
"""Where a training step's time goes: the run's own step under torch.profiler, and MFU per variant.

The step is the trainer's: `trainer/main.py --config configs/xlmr-base-conll2003.yaml` on the full
CoNLL-2003 training set with `train.epochs=1` (what bench/quality.py --defaults runs), built with
the loop's own functions (load_data, plan_run, engine_spec, attention_kernel, load_model,
fit_embedding_updates, build_engine, plan_schedule) and run with step.py's `train_step` and the
loop's one all-reduce: one worker, ZeRO-0, the run's precision (bf16 autocast on a CPU with
AVX512-BF16 or AMX), sparse embedding updates (auto, one CPU worker), the length-grouped batches
of `train.batch_tokens` (auto, or --batch-tokens). What the loop does around a step (evaluations,
checkpoints, the log) is left out; the loop's accounting (FLOPs, MFU) is the same as `train_mfu`.

Each variant (--compare) gets its own engine on the same batches; after --warmup steps each, the
variants run --steps steps in alternating blocks of --block steps, unprofiled: seconds a step,
tokens/s (real and padded), MFU. Then the first variant (or those --profile names) runs the
same steps again under torch.profiler: seconds a step by phase (step.py's record_function ranges:
data, forward, backward, optimizer, collectives; "Python/other" the step's wall time outside them)
and the top torch ops by self CPU time.

    python bench/profile_step.py                                                 # the default step
    python bench/profile_step.py --compare default sdpa --profile default sdpa   # side by side, one run
    python bench/profile_step.py --model builtin:tiny-xlmr --steps 5             # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONLL = SHARED / "data" / "conll2003"
OUT = REPO / "bench" / "out"
ENCODER = OUT / "encoder"  # the offline encoder bench/quality.py builds (gitignored)
CONFIG = REPO / "configs" / "xlmr-base-conll2003.yaml"

# The variants --compare knows: what each changes against the trainer's defaults.
VARIANTS = {
    "default": "the trainer's choices (model.attention auto: eager under bf16 autocast on CPU)",
    "eager": "model.attention=eager",
    "sdpa": "model.attention=sdpa (torch's fused CPU attention)",
    "compile": "torch.compile of each transformer block (nn.Module.compile, dynamic shapes)",
    "threads1": "one torch thread instead of all",
    "dense": "train.embedding_updates=dense",
    "dropout0": "model.dropout=0 (no dropout masks: hidden, attention and the head's)",
    "dropout0.1": "model.dropout=0.1 (the model's own; the config sets 0)",
}


@dataclass
class Arm:
    """One variant: its engine, its thread count and its figures."""

    name: str
    engine: Any
    spec: Any  # its EngineSpec
    threads: int
    build_s: float
    warmup_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    flops: float = 0.0
    tokens: int = 0
    padded: int = 0
    profile: dict[str, Any] | None = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ENCODER), help="model folder or builtin:tiny-xlmr")
    ap.add_argument("--steps", type=int, default=60, help="measured (and profiled) steps per variant")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    ap.add_argument("--block", type=int, default=5, help="steps per turn when variants alternate")
    ap.add_argument("--batch-tokens", default="auto", help="train.batch_tokens (default auto)")
    ap.add_argument("--epochs", type=float, default=1.0, help="train.epochs, which auto's budget follows")
    ap.add_argument("--compare", nargs="+", default=["default"], choices=sorted(VARIANTS), metavar="VARIANT")
    ap.add_argument(
        "--profile",
        nargs="*",
        default=None,
        metavar="VARIANT",
        help="variants to profile (default: the first; none given: timings and MFU only)",
    )
    ap.add_argument("--trace", action="store_true", help="also a Chrome trace of the first profiled variant")
    ap.add_argument("--top", type=int, default=12, help="torch ops listed by self CPU time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    args = ap.parse_args()

    if not SHARED.is_dir():
        print(
            f"profile_step.py: {SHARED} is absent: this benchmark needs ../shared (CoNLL-2003)",
            file=sys.stderr,
        )
        return 2
    if not args.model.startswith("builtin:") and not Path(args.model).is_dir():
        print(
            f"profile_step.py: {args.model} not found: run bench/quality.py once to build the offline "
            "encoder, or pass --model builtin:tiny-xlmr",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("raytag").setLevel(logging.INFO)

    import torch

    from raytag.trainer import dist
    from raytag.trainer.config import load_config
    from raytag.trainer.flops import device_peak, measured_cpu_peak, mfu, model_flops, rounded
    from raytag.trainer.loop import plan_run
    from raytag.trainer.progress import seed_everything
    from raytag.trainer.run_data import load_data

    stamp = time.strftime("%Y%m%d-%H%M%S")
    OUT.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        CONFIG,
        [
            f"data.train={CONLL / 'train.txt'}",
            "data.validation=null",
            "data.test=null",
            f"data.prepared={OUT / 'prepared-data'}",
            f"model.name_or_path={args.model}",
            f"train.epochs={args.epochs:g}",
            f"train.batch_tokens={args.batch_tokens}",
            f"run.storage={OUT / 'runs'}",
            "run.name=profile-step",
            *args.set,
        ],
    )
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    threads = torch.get_num_threads()
    seed_everything(tc.seed)
    group = dist.group(0)
    t0 = time.perf_counter()
    data = load_data(cfg, group)
    plan, reader = plan_run(cfg, data, group, None)
    data_s = time.perf_counter() - t0
    epoch = plan.epoch(0)
    reader.start_epoch(0)
    need = args.warmup + args.steps
    if len(epoch.steps) < need:
        print(f"profile_step.py: the epoch has {len(epoch.steps)} steps, fewer than {need}", file=sys.stderr)
        return 2
    pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
    lengths = data.lengths
    device = torch.device("cpu")

    def shape(i: int) -> tuple[int, int, int]:
        """Step i's windows, real tokens and padded tokens (sentences x longest, per micro-batch)."""
        micros = [m for m in epoch.steps[i] if m]
        real = sum(int(lengths[j]) for m in micros for j in m)
        padded = sum(len(m) * max(int(lengths[j]) for j in m) for m in micros)
        return sum(len(m) for m in micros), real, padded

    epoch_shape = [shape(i) for i in range(len(epoch.steps))]
    epoch_real = sum(s[1] for s in epoch_shape)
    epoch_padded = sum(s[2] for s in epoch_shape)
    measured = range(args.warmup, need)
    win = sum(epoch_shape[i][0] for i in measured)
    real = sum(epoch_shape[i][1] for i in measured)
    padded = sum(epoch_shape[i][2] for i in measured)

    arms = [build_arm(name, cfg, data, plan, threads) for name in args.compare]
    spec = arms[0].spec
    precision = spec.precision
    peak = device_peak(device, precision)  # as a run measures it, once its engine is built (open_session)
    cpu = cpu_description()
    model_flop = model_flops(arms[0].engine.module)
    print(
        f"\nmodel {args.model}; {threads} torch threads of {cpu['cpus']} CPUs ({cpu['model_name']}, "
        f"AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}, AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'}); "
        f"{precision}{' autocast' if spec.cpu_autocast else ''}; "
        f"{'sparse' if spec.sparse_embeddings else 'dense'} embedding updates; "
        f"ZeRO-{arms[0].engine.zero_optimization_stage()}; 1 worker"
    )
    print(
        f"train.batch_tokens {plan.batch_tokens} (pools of {plan.pool_batches} batches), {len(epoch.steps)} steps "
        f"in epoch 0; data and plan {data_s:.1f} s; peak {peak.flops / 1e9:.1f} GFLOP/s ({peak.source})"
    )
    print(
        f"measured steps {args.warmup}..{need - 1}: {win / args.steps:.1f} windows, {real / args.steps:.0f} real "
        f"and {padded / args.steps:.0f} padded tokens a step; padding {1 - real / padded:.1%} of the padded "
        f"tokens (epoch 0: {1 - epoch_real / epoch_padded:.1%})"
    )

    def run_step(arm: Arm, i: int) -> tuple[float, float]:
        """Step i on `arm`, as train_epochs runs it; its seconds and model FLOPs."""
        from raytag.trainer.step import PHASES, train_step

        torch.set_num_threads(arm.threads)
        t = time.monotonic()
        mine = train_step(arm.engine, reader.windows, epoch.steps[i], epoch.labelled[i], 1, pad_id, device)
        with torch.profiler.record_function(PHASES["collectives"]):
            _, tokens, _, squares = dist.all_sum([float(x) for x in mine])
        seconds = time.monotonic() - t
        return seconds, model_flop.train_flops(tokens, squares)

    # warm-up (a compiled model compiles here: its first steps' seconds are reported apart)
    for arm in arms:
        for i in range(args.warmup):
            arm.warmup_s.append(run_step(arm, i)[0])
    # measured: alternating blocks of steps
    for b0 in range(args.warmup, need, args.block):
        for arm in arms:
            for i in range(b0, min(need, b0 + args.block)):
                s, f = run_step(arm, i)
                arm.step_s.append(s)
                arm.flops += f
    torch.set_num_threads(threads)
    peak_end = measured_cpu_peak(precision)

    base = arms[0]
    print(
        f"\n{'variant':<10} {'build s':>8} {'warm-up s':>10} {'s/step':>8} {'p50 s':>7} {'real tok/s':>11} "
        f"{'padded tok/s':>13} {'MFU':>7} {'MFU@best':>9} {'vs ' + base.name:>12}"
    )
    best = max(peak.flops or 0.0, peak_end.flops or 0.0)
    for arm in arms:
        total = sum(arm.step_s)
        arm.tokens, arm.padded = real, padded
        arm_mfu = mfu(arm.flops / total, peak, 1)
        print(
            f"{arm.name:<10} {arm.build_s:>8.1f} {sum(arm.warmup_s):>10.1f} {total / args.steps:>8.4f} "
            f"{statistics.median(arm.step_s):>7.4f} {real / total:>11.0f} {padded / total:>13.0f} "
            f"{arm_mfu or 0:>7.1%} {arm.flops / total / best:>9.1%} {sum(base.step_s) / total:>11.2f}x"
        )
    print(
        f"MFU as train_mfu: model FLOPs (trainer/flops.py) per step second over the peak measured at the "
        f"start ({peak.flops / 1e9:.1f} GFLOP/s); MFU@best over the higher of that and the peak measured "
        f"again at the end ({peak_end.flops / 1e9:.1f})"
    )
    if abs(peak_end.flops - peak.flops) > 0.1 * best:
        print("the two peaks differ by over 10%: something else ran on these cores; compare variants only")

    profiled = [a for a in arms if a.name in args.profile] if args.profile is not None else arms[:1]
    for k, arm in enumerate(profiled):
        trace = OUT / f"profile-{stamp}-{arm.name}.trace.json" if args.trace and k == 0 else None
        arm.profile = profile(arm, measured, run_step, args.top, trace)
        print_profile(arm, args.steps)

    record = {
        "stamp": stamp,
        "command": " ".join(sys.argv),
        "model": args.model,
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": threads,
        "precision": precision,
        "batch_tokens": plan.batch_tokens,
        "pool_batches": plan.pool_batches,
        "steps_in_epoch": len(epoch.steps),
        "measured_steps": [args.warmup, need - 1],
        "windows_per_step": win / args.steps,
        "real_tokens_per_step": real / args.steps,
        "padded_tokens_per_step": padded / args.steps,
        "padding_share": 1 - real / padded,
        "epoch_padding_share": 1 - epoch_real / epoch_padded,
        "peak_flops": peak.flops,
        "peak_source": peak.source,
        "peak_flops_end": peak_end.flops,
        "variants": {
            arm.name: {
                "what": VARIANTS[arm.name],
                "build_s": arm.build_s,
                "warmup_s": arm.warmup_s,
                "seconds_per_step": sum(arm.step_s) / args.steps,
                "median_step_s": statistics.median(arm.step_s),
                "real_tokens_per_s": real / sum(arm.step_s),
                "padded_tokens_per_s": padded / sum(arm.step_s),
                "mfu": rounded(mfu(arm.flops / sum(arm.step_s), peak, 1)),
                "mfu_best_peak": rounded(arm.flops / sum(arm.step_s) / max(peak.flops, peak_end.flops)),
                "profile": arm.profile,
            }
            for arm in arms
        },
    }
    path = OUT / f"profile-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecord: {path.relative_to(REPO)}")
    return 0


def build_arm(name: str, cfg: Any, data: Any, plan: Any, threads: int) -> Arm:
    """A variant's engine, built as train_loop builds the run's (one worker, a new run)."""
    import dataclasses

    from raytag.trainer.engine import (
        attention_kernel,
        build_engine,
        engine_spec,
        fit_embedding_updates,
        plan_schedule,
    )
    from raytag.trainer.model import load_model

    t0 = time.perf_counter()
    tc, mc = cfg.train, cfg.model
    if name in ("eager", "sdpa"):
        mc = dataclasses.replace(mc, attention=name)
    if name in ("dropout0", "dropout0.1"):
        mc = dataclasses.replace(mc, dropout=float(name.removeprefix("dropout")))
    if name == "dense":
        tc = dataclasses.replace(tc, embedding_updates="dense")
        cfg = dataclasses.replace(cfg, train=tc)
    spec = engine_spec(
        cfg,
        1,
        plan.total_steps,
        False,
        planned_world=plan.lanes // tc.gradient_accumulation_steps,
        accumulation=plan.lanes,
    )
    attention = attention_kernel(mc.attention, spec)
    model = load_model(mc.name_or_path, data.labels, data.tokenizer, tc.seed, mc.dropout, attention)
    spec = fit_embedding_updates(spec, tc.embedding_updates, model)
    engine = build_engine(model, spec)
    plan_schedule(engine, spec.warmup_steps, spec.total_steps, rate_now=False)
    if name == "compile":
        # The blocks, not the whole model: the embedding's sparse gradient and the row-settling hook
        # before its lookup (sparse_adam.py) break dynamo's graph; the blocks hold the FLOPs, and
        # identical blocks share one compiled graph (their parameters are inputs to it).
        for block in engine.module.base_model.encoder.layer:
            block.compile(dynamic=True)
    engine.module.train()
    print(f"{name}: {attention} attention, {spec.precision}, built in {time.perf_counter() - t0:.1f} s")
    return Arm(name, engine, spec, 1 if name == "threads1" else threads, time.perf_counter() - t0)


def profile(
    arm: Arm,
    steps: range,
    run_step: Callable[[Arm, int], tuple[float, float]],
    top: int,
    trace: Path | None,
) -> dict[str, Any]:
    """`steps` on `arm` under torch.profiler (CPU): seconds by phase and the top ops by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity

    from raytag.trainer.step import PHASES

    walls = []
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=trace is not None) as prof:
        for i in steps:
            walls.append(run_step(arm, i)[0])
    wall = sum(walls)
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    phases: dict[str, float] = {}
    for phase, label in PHASES.items():
        e = by_name.get(label)
        phases[phase] = (e.cpu_time_total / 1e6) if e is not None else 0.0
    phases["Python/other"] = max(0.0, wall - sum(phases.values()))
    ops = [e for e in events if not e.key.startswith("raytag.") and not e.key.startswith("ProfilerStep")]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    top_ops = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in ops[:top]]
    if trace is not None:
        prof.export_chrome_trace(str(trace))
        print(f"Chrome trace: {trace.relative_to(REPO)}")
    return {
        "wall_s": wall,
        "steps": len(walls),
        "phases_s": phases,
        "top_ops": top_ops,
        "ops_self_s": sum(e.self_cpu_time_total for e in ops) / 1e6,
    }


def print_profile(arm: Arm, steps: int) -> None:
    p = arm.profile
    assert p is not None
    wall = p["wall_s"]
    unprofiled = sum(arm.step_s) / steps
    print(
        f"\n{arm.name}: {steps} steps under torch.profiler, {wall / steps:.4f} s a step "
        f"({wall / steps / unprofiled - 1:+.1%} against the unprofiled steps)"
    )
    print(f"{'phase':<14} {'s/step':>8} {'share':>7}")
    for phase, s in p["phases_s"].items():
        print(f"{phase:<14} {s / steps:>8.4f} {s / wall:>7.1%}")
    print(f"\n{'op (self CPU time)':<44} {'calls/step':>10} {'ms/step':>8} {'share':>7}")
    for op in p["top_ops"]:
        print(
            f"{op['op'][:44]:<44} {op['calls'] / steps:>10.1f} {op['self_s'] / steps * 1e3:>8.2f} "
            f"{op['self_s'] / wall:>7.1%}"
        )


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and its bf16 flags (lscpu's), for the record."""
    name, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model_name": name,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


if __name__ == "__main__":
    sys.exit(main())
