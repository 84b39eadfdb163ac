"""End-to-end training on the shipped demo data with the tiny XLM-R, through DeepSpeed on CPU."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.helpers import (
    ROOT,
    RUN_OUTPUTS,
    assert_tensorboard_matches_metrics,
    cli,
    kill_training_at_micro_batch,
)
from tests.helpers import run_losses as losses
from tests.helpers import run_records as records
from tests.helpers import train_demo as run

pytestmark = pytest.mark.slow


def test_two_zero2_steps_lower_the_loss(tmp_path, caplog):
    # 16 sentences in one batch: both steps see the same data, so the loss must fall.
    # One worker runs ZeRO-0 by default; DeepSpeed JSON forces stage 2.
    caplog.set_level("INFO", logger="raytag")
    run(
        tmp_path,
        "two",
        "data.max_train_samples=16",
        "data.max_eval_samples=16",
        "train.batch_tokens=100000",
        "train.max_steps=2",
        "train.log_every=1",
        "train.deepspeed.zero_optimization.stage=2",
        "train.warmup_ratio=0",
        "train.learning_rate=1e-2",
        "model.dropout=0.0",
    )
    assert "ZeRO-2, 1 worker(s)" in caplog.text
    got = losses(tmp_path / "two")
    assert set(got) == {1, 2}
    assert got[2] < got[1] - 0.05, got


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_a_local_run_ends_the_process_group_it_started_and_leaves_a_launchers_alone(tmp_path, monkeypatch):
    # torch's rule: destroy_process_group() before the process exits. A gloo group left to the
    # interpreter's teardown can crash the exit of a run that finished (pytorch/pytorch#179291).
    import os
    import socket

    tiny = ("data.max_train_samples=8", "data.max_eval_samples=8", "train.max_steps=1")
    assert not torch.distributed.is_initialized()
    env = {k: os.environ.get(k) for k in DIST_ENV}
    run(tmp_path, "own", *tiny)
    assert not torch.distributed.is_initialized()
    assert {k: os.environ.get(k) for k in DIST_ENV} == env  # the next run picks its own port
    run(tmp_path, "again", *tiny)  # and starts a group of its own
    assert not torch.distributed.is_initialized()

    # A launcher's group (Ray Train's TorchConfig starts one in each worker) outlives the run.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in zip(DIST_ENV, ("0", "0", "1", "127.0.0.1", str(port)), strict=True):
        monkeypatch.setenv(k, v)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        run(tmp_path, "launched", *tiny)
        assert torch.distributed.is_initialized()
    finally:
        import deepspeed.comm

        # DeepSpeed's: torch's destroy alone leaves DeepSpeed's cached groups to the next run here
        deepspeed.comm.destroy_process_group()


@pytest.mark.parametrize("embeddings", ["dense", "sparse"])
def test_resume_gives_the_same_next_losses(tmp_path, monkeypatch, embeddings):
    # sparse: the rows' owed steps and per-step records travel in the optimizer state
    common = [
        "data.max_train_samples=96",
        "data.max_eval_samples=16",
        "data.test=null",
        "train.batch_tokens=384",
        "train.max_steps=4",
        "train.save_every=2",
        "train.log_every=1",
        f"train.embedding_updates={embeddings}",
    ]
    run(tmp_path, "straight", *common)
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == [1, 2, 3, 4]

    # The same run, killed during step 4 (step 3 logged after the step-2 checkpoint) ...
    restore = kill_training_at_micro_batch(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "resumed", *common)
    restore()
    assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3]
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000002"]

    # ... and run again with the same command: it continues from step 2, not from scratch.
    res = run(tmp_path, "resumed", *common)
    assert res["resumed_from"] == "step-00000002"
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]  # steps 1-2 kept from the first attempt, 3-4 trained now
    # TensorBoard too: step 3 of the first attempt is purged by the second attempt's writer
    assert len(list((tmp_path / "resumed" / "tensorboard").iterdir())) == 2
    assert_tensorboard_matches_metrics(tmp_path / "resumed" / "tensorboard", records(tmp_path / "resumed"))
    torch.testing.assert_close(
        torch.tensor([resumed[s] for s in (1, 2, 3, 4)]),
        torch.tensor([straight[s] for s in (1, 2, 3, 4)]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_checkpoint_that_fails_its_check_on_fetch_falls_back_to_the_previous_one(
    tmp_path, monkeypatch, caplog
):
    """The newest checkpoint's files have their manifest's sizes (so it is picked) but not its
    sha256 (a file rewritten after its manifest): the resume warns and continues from the one before."""
    caplog.set_level("INFO", logger="raytag")
    common = [
        "data.max_train_samples=96",
        "data.max_eval_samples=16",
        "data.test=null",
        "train.batch_tokens=384",
        "train.max_steps=6",
        "train.eval_every=2",  # a checkpoint with a validation F1 every 2 steps: retention keeps them
        "train.log_every=1",
        "run.keep_best=3",
    ]
    restore = kill_training_at_micro_batch(monkeypatch, 5)  # dies in step 5: checkpoints 2 and 4 saved
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "r", *common)
    restore()
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    rng = ckpts / "step-00000004" / "rng-rank0.pt"
    rng.write_bytes(bytes(b ^ 0xFF for b in rng.read_bytes()))  # same size, other bytes

    res = run(tmp_path, "r", *common)
    assert res["resumed_from"] == "step-00000002" and res["global_steps"] == 6
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "checkpoint step-00000004 failed its check on fetch" in m and "rng-rank0.pt" in m for m in warned
    ), warned


def test_a_run_whose_lease_cannot_be_renewed_stops_before_it_could_expire(tmp_path, monkeypatch):
    """Storage unreachable for the lease (every renewal fails): the run is fenced, stops at its next
    step, and writes no checkpoint (its lease may be another job's by then)."""
    import functools

    from raytag.cluster.runlock import RunLock, RunLockedError
    from raytag.cluster.storage import StorageError
    from raytag.trainer.stopping import STOP

    def unreachable(self):
        raise StorageError("cannot reach the endpoint (connection refused)", transient=True)

    monkeypatch.setattr(
        RunLock, "__init__", functools.partialmethod(RunLock.__init__, ttl_s=1.0, heartbeat_s=0.2)
    )
    monkeypatch.setattr(RunLock, "_renew", unreachable)
    with pytest.raises(
        RunLockedError, match="could not be renewed for 1 s .*stopping before writing checkpoint"
    ) as e:
        run(tmp_path, "fenced", "data.max_train_samples=400", "train.batch_tokens=64", "train.epochs=50")
    # at the step after the fence (setup alone outlasts it), not at the epoch's end (about 200 steps)
    assert int(str(e.value).rsplit("step-", 1)[1]) < 20, e.value
    assert not STOP.requested
    assert not list((tmp_path / "fenced").glob("checkpoints/*/MANIFEST.json"))


def test_a_finished_run_trains_on_when_asked_for_more_steps(tmp_path, caplog):
    common = ["data.max_train_samples=48", "data.max_eval_samples=16", "data.test=null", "train.log_every=1"]
    first = run(tmp_path, "longer", *common, "train.max_steps=3")
    before = losses(tmp_path / "longer")
    caplog.set_level("INFO", logger="raytag")
    again = run(tmp_path, "longer", *common, "train.max_steps=3")  # the same settings: nothing to do
    assert "already finished" in caplog.text and again == first

    more = run(tmp_path, "longer", *common, "train.max_steps=5")
    assert "finished at step 3; training on to step 5" in caplog.text
    assert more["resumed_from"] == "step-00000003" and more["global_steps"] == 5
    after = losses(tmp_path / "longer")
    assert sorted(after) == [1, 2, 3, 4, 5]
    assert all(after[s] == before[s] for s in (1, 2, 3))  # the first 3 steps are the finished run's
    assert json.loads((tmp_path / "longer" / "results.json").read_text())["global_steps"] == 5


def test_logged_tokens_per_second_counts_the_steps_only(tmp_path, monkeypatch):
    """An evaluation and a checkpoint between two log lines are not training time: the seconds
    behind every logged tokens/s add up to the run's step time, however slow the evaluations."""
    import time

    import raytag.trainer.session as session

    real = session.evaluate

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "evaluate", slow)
    common = ["data.max_train_samples=48", "data.max_eval_samples=16", "data.test=null"]
    results = run(tmp_path, "tok", *common, "train.max_steps=6", "train.log_every=2", "train.eval_every=2")
    logged = [r for r in records(tmp_path / "tok") if r.get("type") == "train"]
    assert [r["step"] for r in logged] == [2, 4, 6]
    seen = [0] + [r["tokens_seen"] for r in logged]
    counted = sum(
        (b - a) / r["tokens_per_second"] for a, b, r in zip(seen[:-1], seen[1:], logged, strict=True)
    )
    assert counted == pytest.approx(
        results["train_runtime_seconds"], rel=0.05, abs=0.05
    )  # 2 s of evaluations aside


def test_save_every_minutes_checkpoints_on_the_clock(tmp_path, caplog):
    caplog.set_level("INFO", logger="raytag")
    run(
        tmp_path,
        "clock",
        "data.max_train_samples=96",
        "data.max_eval_samples=16",
        "data.test=null",
        "train.batch_tokens=384",
        "train.max_steps=8",
        "train.save_every_minutes=0.0001",  # 6 ms: due at (nearly) every step boundary
    )
    timed = [r.getMessage() for r in caplog.records if "minutes since the last checkpoint" in r.getMessage()]
    assert len(timed) >= 3, caplog.text[-3000:]  # steps 1-7 (step 8 is the final evaluation's checkpoint)
    saved = {m.split("saved checkpoint ")[1].split()[0] for m in caplog.messages if "saved checkpoint" in m}
    assert len(saved) >= len(timed), saved


def test_auto_batch_tokens_is_logged_and_planned(tmp_path, caplog):
    # The demo config sets 1024 tokens; `auto` on its ~1000 training sentences, one epoch, picks a
    # smaller budget, says so in one line, and the loop's plan has the steps that line announces.
    caplog.set_level("INFO", logger="raytag")
    run(
        tmp_path,
        "auto",
        "train.batch_tokens=auto",
        "train.epochs=1",
        "train.max_steps=1",
        "data.max_eval_samples=8",
        "data.test=null",
    )
    auto = [r.getMessage() for r in caplog.records if "train.batch_tokens=auto:" in r.getMessage()]
    assert len(auto) == 1, auto
    m = re.search(r"auto: (\d+) padded tokens .* (\d+) steps per epoch", auto[0])
    assert m and int(m.group(1)) < 1024, auto[0]
    planned = re.search(r"\d+ steps \((\d+) per epoch\)", caplog.text)
    assert planned and abs(int(planned.group(1)) - int(m.group(2))) <= 0.02 * int(m.group(2)), caplog.text


def test_demo_learns_and_writes_every_output(demo_run):
    run_dir, res = demo_run
    for rel in RUN_OUTPUTS:
        assert (run_dir / rel).exists(), rel
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("validation", "test"):
        for key in ("f1", "precision", "recall", "accuracy", "per_type"):
            assert key in results[split]
    assert results["validation"]["f1"] > 0.4, results["validation"]["f1"]
    assert results["train_tokens_per_second"] > 0 and results["train_runtime_seconds"] > 0
    # Model FLOPs: 6 x non-embedding parameters per real token, plus attention (at most 512 per token).
    from raytag.trainer.flops import model_flops
    from raytag.trainer.model import load_model, load_tokenizer

    fl = model_flops(
        load_model("builtin:tiny-xlmr", results["labels"], load_tokenizer("builtin:tiny-xlmr"), 0)
    )
    matmuls = 6 * fl.params * results["train_tokens"]
    assert (
        matmuls < results["train_flops"] < matmuls + 12 * fl.layers * fl.width * 512 * results["train_tokens"]
    )
    assert 0 < results["train_mfu"] < 1 and results["peak_flops_per_device"] > 0
    assert "matmul measured" in results["peak_flops_source"] and results["devices"] == 1
    assert results["provenance"]["data"]["train"]["sha256"]
    assert set(results["validation"]["per_type"]) == {"LOC", "MISC", "ORG", "PER"}
    # predictions/<split>.txt: every evaluated word, `word gold pred`.
    lines = [ln for ln in (run_dir / "predictions" / "test.txt").read_text().splitlines() if ln.strip()]
    n_words = sum(
        1
        for ln in (ROOT / "trainer/assets/demo/test.txt").read_text().splitlines()
        if ln.strip() and not ln.startswith("-DOCSTART-")
    )
    assert len(lines) == n_words
    assert all(len(ln.split(" ")) == 3 for ln in lines)
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("type") == "eval" for r in evals) and any(r.get("type") == "train" for r in evals)
    for r in (r for r in evals if r.get("type") == "train"):
        assert r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1, r
    # TensorBoard: every scalar of metrics.jsonl, one point per logged step, read by its own loader
    assert_tensorboard_matches_metrics(run_dir / "tensorboard", evals)
    # Checkpoints: complete ones only, each with its manifest.
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert ckpts and all((c / "MANIFEST.json").exists() for c in ckpts)


def test_model_card_is_filled_in(demo_run):
    run_dir, _ = demo_run
    card = (run_dir / "model" / "README.md").read_text()
    assert "More information needed" not in card
    for section in (
        "## Model description",
        "## Intended uses & limitations",
        "## Training and evaluation data",
        "### Training hyperparameters",
        "### Speed",
        "### Training results",
        "### Framework versions",
    ):
        assert section in card
        body = card.split(section, 1)[1].split("\n#", 1)[0]
        assert len(body.strip()) > 20, section
    assert "| 1.00 |" in card  # per-epoch results table has the first epoch
    assert "test entity F1" in card


def test_model_folder_holds_the_plots_the_card_links(demo_run):
    from PIL import Image

    from raytag.trainer.plots import PLOTS, SIZES

    run_dir, _ = demo_run
    card = (run_dir / "model" / "README.md").read_text()
    assert "## Training curves and errors" in card and "absent" not in card
    for name in PLOTS:
        assert f"]({name})" in card, name  # a relative link: the hub shows it beside the card
        with Image.open(run_dir / "model" / name) as im:
            im.load()
            assert (im.format, im.size) == ("PNG", SIZES[name]), name


def test_exported_model_tags_through_pipeline(demo_run):
    from transformers import pipeline

    run_dir, _ = demo_run
    tagger = pipeline("token-classification", model=str(run_dir / "model"), aggregation_strategy="simple")
    text = "Maria Schmidt , a spokeswoman for Siemens , said in Berlin on Monday ."
    ents = tagger(text)
    assert ents, "the trained demo model should find entities"
    assert {e["entity_group"] for e in ents} <= {"PER", "LOC", "ORG", "MISC"}
    assert all(text[e["start"] : e["end"]] == e["word"].strip() for e in ents)


def test_predict_cli_tags_conll_and_text(demo_run, tmp_path):
    run_dir, _ = demo_run
    long_sentence = " ".join(["Paris"] + ["and", "Berlin"] * 150)  # 301 words: many windows of 64 tokens
    (tmp_path / "in.txt").write_text("Maria Schmidt visited Zürich .\n" + long_sentence + "\n")
    out = tmp_path / "out.txt"
    r = cli(
        "predict",
        "--model",
        str(run_dir / "model"),
        "--input",
        str(tmp_path / "in.txt"),
        "--format",
        "text",
        "--output-format",
        "conll",  # text input writes entities by default
        "--output",
        str(out),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    blocks = out.read_text().strip().split("\n\n")
    assert [len(b.splitlines()) for b in blocks] == [5, 301]
    assert blocks[1].splitlines()[0].split()[0] == "Paris"


def test_test_scores_and_model_come_from_the_checkpoint_the_manifest_names_as_best(demo_run, tmp_path):
    from raytag.trainer.predict import predict

    run_dir, res = demo_run
    latest = max((run_dir / "checkpoints").iterdir())
    manifest = json.loads((latest / "MANIFEST.json").read_text())
    best = manifest["meta"]["best"]
    assert best == f"step-{res['best_step']:08d}" == res["best_checkpoint"] == res["model_checkpoint"]
    assert (run_dir / "checkpoints" / best / "MANIFEST.json").exists()  # kept by retention
    assert json.loads((run_dir / "model" / "raytag.json").read_text())["checkpoint"] == best
    # The exported weights score the test file exactly as results.json says (same model, same windows).
    scores = predict(
        str(run_dir / "model"), str(ROOT / "trainer/assets/demo/test.txt"), str(tmp_path / "p.txt")
    )
    assert scores["f1"] == pytest.approx(res["test"]["f1"], abs=1e-9)
    # And validation, re-scored with those weights, equals the best evaluation logged during training.
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at_best = [
        r
        for r in evals
        if r.get("type") == "eval" and r["split"] == "validation" and r["step"] == res["best_step"]
    ]
    assert at_best and at_best[0]["f1"] == pytest.approx(res["validation"]["f1"], abs=1e-9)
