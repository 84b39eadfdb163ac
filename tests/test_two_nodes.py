"""The real cluster shape on one machine: two Ray nodes (each its own temp dir, TMPDIR and one
`raytag_slot`, so each hosts one training worker), S3 storage on the real test server, jobs
submitted with `ray job submit` as users do.

- A local-folder `run.storage` is refused before step 1 although the second node joined after
  the job started (the driver saw one node; the placed workers see two).
- Training data from an s3:// prefix of several CoNLL files: each rank reads only its shards, and the
  run equals one worker trained on one local file with the same sentences.
- ZeRO-2 and ZeRO-3 with 2 workers (one per node): outputs in the bucket, both ranks' shards
  in the manifest, evaluation completing on an evaluation set whose batches split unequally
  between the ranks, test scores from the checkpoint the manifest names as best, per-step
  losses equal to 1 worker with 2 accumulation steps, and no staging left on either node.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from raytag.trainer.config import load_config
from tests.helpers import RAY_SMALL, ROOT, RUN_OUTPUTS, assert_matches_one_worker, submit_job, wait_job
from tests.ray_cluster import SLOT, RayCluster

RAY = str(Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.integration]

COMMON = [*RAY_SMALL, "train.eval_every=2"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head with one slot; tests add the second node (the first test does it while its job waits).

    The S3 server's variables are in every node's environment: workers take credentials from
    their node, never from the job."""
    with RayCluster(env=s3_server.aws_env()) as c:
        c.start_head()
        yield c


def two_nodes(cluster: RayCluster) -> None:
    if len(cluster.nodes) < 2:
        cluster.add_node()


def submit(cluster: RayCluster, *overrides: str) -> str:
    return submit_job(
        cluster.dashboard_url,
        cluster.env,
        "scaling.num_workers=2",
        f"scaling.worker_resources={{{SLOT}: 1}}",
        *overrides,
    )


def wait(cluster: RayCluster, job_id: str) -> tuple[str, str]:
    return wait_job(cluster.dashboard_url, job_id)


def test_local_folder_is_refused_when_a_node_joins_after_the_job_started(cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert len(cluster.nodes) == 1
    job_id = submit(cluster, f"run.storage={tmp_path / 'runs'}", "run.name=local", *COMMON)
    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.time() + 120
    while "Ray Train: 2 worker(s)" not in client.get_job_logs(job_id) and time.time() < deadline:
        time.sleep(1)  # the driver passed its own check (one node) and waits for a second slot
    assert client.get_job_status(job_id) == JobStatus.RUNNING
    cluster.add_node()
    status, logs = wait(cluster, job_id)
    assert status == "FAILED", logs[-4000:]
    assert "raytag: error: run.storage: the local folder" in logs and "sit on 2 nodes" in logs, logs[-4000:]
    assert "step 1/" not in logs  # refused before the first step
    assert logs.count("[FailurePolicy] RETRY") == 0, logs[-4000:]  # a user error is not retried
    assert not (tmp_path / "runs" / "local" / "metrics.jsonl").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_on_two_nodes(cluster, aws_env, stage, tmp_path):
    two_nodes(cluster)
    bucket = aws_env.make_bucket()
    name = f"zero{stage}"
    job_id = submit(
        cluster, f"run.storage=s3://{bucket}/runs", f"run.name={name}", f"train.zero_stage={stage}", *COMMON
    )
    status, logs = wait(cluster, job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    assert f"ZeRO-{stage}, 2 worker(s)" in logs

    client = aws_env.client()

    def get(rel: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"runs/{name}/{rel}")["Body"].read()

    listed = {
        o["Key"][len(f"runs/{name}/") :]
        for o in client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/", MaxKeys=1000)["Contents"]
    }
    for rel in RUN_OUTPUTS:
        assert rel in listed, rel
    results = json.loads(get("results.json"))
    assert results["global_steps"] == 6
    manifest = json.loads(get("checkpoints/step-00000006/MANIFEST.json"))
    files = {f["path"] for f in manifest["files"]}
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= files
    assert any("zero_pp_rank_0_" in f for f in files) and any("zero_pp_rank_1_" in f for f in files)
    assert manifest["meta"]["world"] == 2
    # Test scores come from the checkpoint the manifest names as best, and so do model/'s weights.
    best = manifest["meta"]["best"]
    assert best == results["best_checkpoint"] == results["model_checkpoint"]
    assert f"checkpoints/{best}/MANIFEST.json" in listed
    model = tmp_path / "model"
    for rel in listed:
        if rel.startswith("model/"):
            (model / rel[len("model/") :]).parent.mkdir(parents=True, exist_ok=True)
            (model / rel[len("model/") :]).write_bytes(get(rel))
    assert json.loads((model / "raytag.json").read_text())["checkpoint"] == best
    from raytag.trainer.predict import predict

    test_file = tmp_path / "test.txt"
    test_file.write_text(
        "".join(block + "\n\n" for block in _first_sentences(ROOT / "trainer/assets/demo/test.txt", 60))
    )
    scores = predict(str(model), str(test_file), str(tmp_path / "pred.txt"))
    assert scores["f1"] == pytest.approx(results["test"]["f1"], abs=1e-9)
    # Evaluation ran on both ranks with unequal shares: validation's batches are odd in number.
    assert _eval_batches(60) % 2 == 1
    evals = [json.loads(x) for x in get("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in evals if r["type"] == "eval" and r["split"] == "validation"] == [2, 4, 6]
    # No staging left on either node once the run finished: the bucket holds it.
    for node in cluster.nodes:
        staged = node.tmpdir / "raytag-staging"
        assert not staged.exists() or not any(p.name.startswith(f"{name}-") for p in staged.iterdir())

    # Data-parallel equivalence: 1 worker with 2 accumulation steps sees the same global batches.
    assert_matches_one_worker(
        get("metrics.jsonl").decode().splitlines(), results, COMMON, tmp_path / "single"
    )


def _first_sentences(path: Path, n: int) -> list[str]:
    """The first `n` sentences of a CoNLL file (data.max_eval_samples=n reads the same)."""
    blocks, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("-DOCSTART-"):
            continue
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks[:n]


def _eval_batches(n: int) -> int:
    """How many evaluation batches the demo's validation set makes (its first n sentences)."""
    from raytag.trainer.batching import plan_batches
    from raytag.trainer.features import encode
    from raytag.trainer.model import load_tokenizer
    from raytag.trainer.run_data import read_splits

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.max_eval_samples={n}"])
    val = read_splits(cfg)["validation"]
    tok = load_tokenizer(cfg.model.name_or_path)
    enc = encode(val.words, None, tok, None, cfg.model.max_length, cfg.model.stride)
    lengths = [len(w) for w in enc.windows]
    return len(plan_batches(lengths, cfg.train.eval_batch_tokens, 1024, seed=0, epoch=0, shuffle=False))


def test_training_from_an_s3_prefix_of_shard_files(cluster, aws_env, tmp_path):
    """Acceptance of sharded data: several CoNLL files under an s3:// prefix, 2 workers on 2 nodes.
    Each rank reads only its own shards (the read log: disjoint, together complete), and the run
    equals one in-process worker (2 accumulation steps: the same global batches) trained on one
    local file holding the files' concatenation: the same per-step losses and dev F1."""
    two_nodes(cluster)
    bucket = aws_env.make_bucket()
    blocks = _first_sentences(ROOT / "trainer/assets/demo/train.txt", 200)
    parts = [blocks[:45], blocks[45:50], blocks[50:130], blocks[130:]]
    client = aws_env.client()
    for i, part in enumerate(parts):
        body = "".join(b + "\n\n" for b in part).encode()
        client.put_object(Bucket=bucket, Key=f"corpora/en/part-{i:02d}.conll", Body=body)
    common = [
        "data.max_eval_samples=60",
        "train.batch_tokens=512",
        "train.epochs=5",  # 20 steps: enough for the tiny model to learn (F1 > 0.1 below)
        "train.log_every=1",
        "model.dropout=0.0",
        "train.precision=fp32",  # as RAY_SMALL: equality with one worker is an fp32 property
    ]
    job_id = submit(
        cluster,
        f"data.train=s3://{bucket}/corpora/en/",
        f"run.storage=s3://{bucket}/runs",
        "run.name=sharded",
        *common,
    )
    status, logs = wait(cluster, job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "prepared 200 sentences -> 7 shards" in logs, logs[-6000:]

    def get(rel: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"runs/sharded/{rel}")["Body"].read()

    results = json.loads(get("results.json"))
    assert results["train_data"]["shards"] == 7
    reads = results["train_data"]["reads"]  # rank -> [[epoch, shard], ...]: what each rank loaded
    for epoch in range(5):
        mine = [{s for e, s in reads[r] if e == epoch} for r in ("0", "1")]
        assert mine[0] and mine[1], reads
        assert not mine[0] & mine[1], reads  # disjoint
        assert sorted(mine[0] | mine[1]) == list(range(7)), reads  # together complete
        assert sum(len([1 for e, _ in reads[r] if e == epoch]) for r in ("0", "1")) == 7  # each read once

    # One local file with the same sentences, one worker with 2 accumulation steps: the same plan.
    local = tmp_path / "all.conll"
    local.write_text("".join(b + "\n\n" for b in blocks), encoding="utf-8")
    assert_matches_one_worker(
        get("metrics.jsonl").decode().splitlines(),
        results,
        [f"data.train={local}", *common],
        tmp_path / "single",
    )
    single = json.loads((tmp_path / "single" / "single" / "results.json").read_text())
    assert results["validation"]["f1"] > 0.1  # it learnt something: the equality below means something
    assert single["validation"]["f1"] == pytest.approx(results["validation"]["f1"], abs=1e-9)
