"""Prepared training shards (trainer/shards.py, the plan: shard_plan.py): fingerprint, checksums,
the per-rank plan, mixtures, and training over them (mid-epoch resume, two weighted corpora with per-language evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raytag.trainer.shard_plan import ShardReader, plan_epoch
from raytag.trainer.shards import Corpus, PrepareSpec, ShardError, find, prepare
from tests.helpers import ROOT
from tests.helpers import run_losses as losses
from tests.helpers import train_demo as train

DEMO_TRAIN = ROOT / "trainer" / "assets" / "demo" / "train.txt"
TOKENIZER = "builtin:tiny-xlmr"


def sentences_of(path: Path) -> list[str]:
    """The demo file's sentences as CoNLL text blocks."""
    blocks = path.read_text(encoding="utf-8").strip().split("\n\n")
    return [b.strip("\n") + "\n" for b in blocks if b.strip() and not b.startswith("-DOCSTART-")]


def write(path: Path, blocks: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(blocks) + "\n", encoding="utf-8")
    return path


def spec(tmp: Path, *paths: str, max_length: int = 64, corpora=None, **kw) -> PrepareSpec:
    return PrepareSpec(
        corpora=corpora or (Corpus("train", tuple(paths), 1.0),),
        tokenizer=TOKENIZER,
        max_length=max_length,
        stride=16,
        tag_scheme="auto",
        strict=False,
        max_sentences=kw.get("max_sentences"),
        labels=None,
        prepared=str(tmp / "prepared"),
    )


@pytest.fixture(scope="module")
def blocks() -> list[str]:
    return sentences_of(DEMO_TRAIN)[:300]


def test_many_files_and_their_concatenation_give_the_same_windows_and_plan(tmp_path, blocks, caplog):
    parts = [blocks[:70], blocks[70:71], blocks[71:200], blocks[200:]]
    files = [write(tmp_path / "many" / f"part-{i}.conll", p) for i, p in enumerate(parts)]
    one = write(tmp_path / "one" / "all.conll", blocks)
    caplog.set_level("INFO", logger="raytag")
    a = prepare(spec(tmp_path, str(tmp_path / "many" / "*.conll")), "tok")
    b = prepare(spec(tmp_path, str(one)), "tok")
    assert a.fingerprint != b.fingerprint  # other inputs: other content keys
    assert [f["uri"] for f in a.manifest["corpora"]["train"]["files"]] == [str(f) for f in files]
    assert a.manifest["sentences"] == b.manifest["sentences"] == 300
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.labelled, b.labelled)
    np.testing.assert_array_equal(a.shard_of, b.shard_of)
    for world, accum in ((2, 1), (1, 2), (3, 2)):
        for r in range(world):
            pa_, _ = plan_epoch(a, {}, 512, 256, 7, 1, world, r, world * accum)
            pb, _ = plan_epoch(b, {}, 512, 256, 7, 1, world, r, world * accum)
            assert pa_ == pb
    # The same windows, token for token, through each rank's reader.
    ra = ShardReader(a, _store(tmp_path), 0)
    rb = ShardReader(b, _store(tmp_path), 0)
    for i in range(0, len(a.lengths), 37):
        wa, wb = ra.windows([i])[0], rb.windows([i])[0]
        assert wa.input_ids.tolist() == wb.input_ids.tolist() and wa.labels.tolist() == wb.labels.tolist()
    # A rerun finds the preparation and says so.
    caplog.clear()
    again = prepare(spec(tmp_path, str(one)), "tok")
    assert again.reused and again.fingerprint == b.fingerprint
    assert "preparation skipped" in caplog.text


def _store(tmp: Path):
    from raytag.cluster.storage import open_storage

    return open_storage(str(tmp / "prepared"))


def test_tokenizer_window_or_one_input_byte_make_new_shards(tmp_path, blocks):
    f = write(tmp_path / "in" / "a.conll", blocks[:50])
    base = prepare(spec(tmp_path, str(f)), "tok-a")
    assert prepare(spec(tmp_path, str(f)), "tok-b").fingerprint != base.fingerprint  # tokenizer
    assert prepare(spec(tmp_path, str(f), max_length=48), "tok-a").fingerprint != base.fingerprint  # window
    data = bytearray(f.read_bytes())
    i = data.index(b" O\n")
    data[i - 1 : i] = b"X"  # one byte of one word
    f.write_bytes(bytes(data))
    changed = prepare(spec(tmp_path, str(f)), "tok-a")
    assert changed.fingerprint != base.fingerprint and not changed.reused
    folders = sorted(p.name for p in (tmp_path / "prepared").iterdir())
    assert len(folders) == 4, folders


def test_model_tokenizer_changes_the_fingerprint():
    """The fingerprint's tokenizer part is the tokenizer's full definition (vocabulary, normaliser)."""
    from raytag.trainer.model import load_tokenizer
    from raytag.trainer.run_data import tokenizer_fingerprint

    real = ROOT.parent / "shared" / "models" / "xlm-roberta-base-tokenizer"
    if not real.is_dir():
        pytest.skip(f"{real} is absent (../shared)")
    assert tokenizer_fingerprint(load_tokenizer(TOKENIZER)) != tokenizer_fingerprint(
        load_tokenizer(str(real))
    )


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_shard_is_detected_rebuilt_and_never_read(tmp_path, blocks, caplog, damage):
    f = write(tmp_path / "in" / "a.conll", blocks[:100])
    first = prepare(spec(tmp_path, str(f)), "tok")
    shard = tmp_path / "prepared" / first.fingerprint / first.manifest["shards"][1]["pieces"][0]["key"]
    good = shard.read_bytes()
    bad = bytearray(good)
    if damage == "flip":
        bad[len(bad) // 2] ^= 0xFF
    else:
        bad = bad[: len(bad) // 2]
    shard.write_bytes(bytes(bad))
    # A reader given the broken shard refuses it before parsing a byte.
    reader = ShardReader(first, _store(tmp_path), 0)
    start = int(first.starts[1])
    with pytest.raises(ShardError, match=r"fails its sha256 check"):
        reader.windows([start])
    assert reader.loaded == {} or 1 not in reader.loaded
    # The next preparation finds it broken and rebuilds it.
    assert find(_store(tmp_path), first.fingerprint, lambda m: None) is None
    caplog.set_level("INFO", logger="raytag")
    second = prepare(spec(tmp_path, str(f)), "tok")
    assert not second.reused and "preparing again" in caplog.text
    assert shard.read_bytes() == good
    assert ShardReader(second, _store(tmp_path), 0).windows([start])


def test_a_bad_line_in_one_of_many_files_is_one_error_naming_file_and_line(tmp_path, blocks):
    from raytag.trainer.conll import ConllError

    write(tmp_path / "in" / "a.conll", blocks[:10])
    b = write(tmp_path / "in" / "b.conll", blocks[10:20])
    lines = b.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0] + " X-PER"
    b.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConllError) as info:
        prepare(spec(tmp_path, str(tmp_path / "in")), "tok")
    assert str(info.value).startswith(f"{b}:4: tag 'X-PER'")


def test_the_plan_gives_each_rank_its_own_shards_and_equal_steps(tmp_path, blocks):
    p = prepare(spec(tmp_path, str(write(tmp_path / "a.conll", blocks))), "tok")
    assert p.num_shards >= 8
    for world, accum in ((2, 1), (2, 2), (3, 1)):
        plans = [plan_epoch(p, {}, 384, 256, 3, 0, world, r, world * accum) for r in range(world)]
        assert len({len(pl.steps) for pl, _ in plans}) == 1  # the same number of steps everywhere
        shard_sets = [set(s) for _, s in plans]
        assert set().union(*shard_sets) == set(range(p.num_shards))  # together complete
        for i in range(world):
            for j in range(i + 1, world):
                assert not shard_sets[i] & shard_sets[j]  # disjoint
        ids = sorted(i for pl, _ in plans for step in pl.steps for mb in step for i in mb)
        assert ids == list(range(len(p.lengths)))  # every window once
        for pl, mine in plans:  # a rank's windows all lie in its own shards
            own = {int(p.shard_of[i]) for step in pl.steps for mb in step for i in mb}
            assert own <= set(mine)
        # step_labelled is the global count of every step
        for s in range(len(plans[0][0].steps)):
            total = sum(int(p.labelled[i]) for pl, _ in plans for mb in pl.steps[s] for i in mb)
            assert plans[0][0].labelled[s] == total
    # 2 workers x 1 == 1 worker x 2 accumulation: the same global batches
    two = [plan_epoch(p, {}, 384, 256, 3, 0, 2, r, 2)[0] for r in range(2)]
    one = plan_epoch(p, {}, 384, 256, 3, 0, 1, 0, 2)[0]
    assert [[two[0].steps[s][0], two[1].steps[s][0]] for s in range(len(one.steps))] == one.steps
    assert plan_epoch(p, {}, 384, 256, 3, 1, 1, 0, 1)[0] != plan_epoch(p, {}, 384, 256, 3, 0, 1, 0, 1)[0]


def test_the_global_batches_do_not_depend_on_the_group_size(tmp_path, blocks):
    """An elastic run's plan: 3 lanes dealt to groups of 1, 2 and 3 ranks give the same global
    micro-batches at every step (a rank with a lane fewer runs an empty one), each window once."""
    p = prepare(spec(tmp_path, str(write(tmp_path / "a.conll", blocks))), "tok")

    def global_steps(world: int) -> list[list[list[int]]]:
        plans = [plan_epoch(p, {}, 384, 256, 3, 0, world, r, 3)[0] for r in range(world)]
        assert len({len(pl.steps) for pl in plans}) == 1
        assert all(len(step) == -(-3 // world) for pl in plans for step in pl.steps)
        return [sorted(mb for pl in plans for mb in pl.steps[s] if mb) for s in range(len(plans[0].steps))]

    one, two, three = global_steps(1), global_steps(2), global_steps(3)
    assert one == two == three
    assert sorted(i for step in one for mb in step for i in mb) == list(range(len(p.lengths)))


def test_a_lanes_batches_mix_its_shards_and_each_shard_is_read_once(tmp_path, blocks, monkeypatch):
    # A shard is a contiguous slice of the corpus (a document's sentences): batched alone, it would
    # fill several steps in a row. Within MIX_WINDOWS, a lane's shards are batched together.
    import raytag.trainer.shard_plan as shard_plan

    p = prepare(spec(tmp_path, str(write(tmp_path / "a.conll", blocks))), "tok")
    plan, mine = plan_epoch(p, {}, 256, 8, 3, 0, 1, 0, 1)
    first = [{int(p.shard_of[i]) for i in step[0]} for step in plan.steps[:4]]
    assert max(len(s) for s in first) > 1, first  # sentences of several shards in one batch
    assert len(set().union(*first)) > 2, first
    # With groups of about two shards, the steps move through the shards group by group, and a
    # reader that keeps two groups loads every shard once.
    monkeypatch.setattr(shard_plan, "MIX_WINDOWS", 2 * max(p.shard_windows(k) for k in range(p.num_shards)))
    plan, mine = plan_epoch(p, {}, 256, 8, 3, 0, 1, 0, 1)
    reader = ShardReader(p, _store(tmp_path), 0, lanes=1)
    for step in plan.steps:
        reader.windows(step[0])
    assert sorted(k for _, k in reader.opened) == sorted(mine) == list(range(p.num_shards))
    seen = [{int(p.shard_of[i]) for i in step[0]} for step in plan.steps]
    assert all(len(s) <= 3 for s in seen)  # a group's shards only (about two)


def test_mixture_weights_draw_shards_per_epoch(tmp_path, blocks):
    en = write(tmp_path / "en.conll", blocks[:200])
    es = write(tmp_path / "es.conll", blocks[200:])
    p = prepare(spec(tmp_path, corpora=(Corpus("en", (str(en),), 1.0), Corpus("es", (str(es),), 1.0))), "tok")
    en_shards = set(p.manifest["corpora"]["en"]["shards"])
    es_shards = set(p.manifest["corpora"]["es"]["shards"])
    assert en_shards and es_shards and not en_shards & es_shards

    def drawn(weights, epoch):
        _, shards = plan_epoch(p, weights, 384, 256, 5, epoch, 1, 0, 1)
        return shards

    twice = drawn({"en": 2.0, "es": 0.5}, 0)
    assert sorted(s for s in twice if s in en_shards) == sorted(list(en_shards) * 2)
    halves = [sorted(s for s in drawn({"en": 2.0, "es": 0.5}, e) if s in es_shards) for e in range(6)]
    assert all(abs(len(h) - len(es_shards) / 2) <= 1 for h in halves), halves
    assert len({tuple(h) for h in halves}) > 1  # a fresh draw each epoch
    assert drawn({"en": 2.0, "es": 0.5}, 3) == drawn({"en": 2.0, "es": 0.5}, 3)  # deterministic


# --------------------------------------------------------------------------- training over shards


@pytest.mark.slow
def test_resume_mid_epoch_over_shards_gives_the_same_losses(tmp_path, blocks, monkeypatch):
    import torch

    from tests.helpers import kill_training_at_micro_batch

    en = write(tmp_path / "data" / "en" / "a.conll", blocks[:150])
    write(tmp_path / "data" / "en" / "b.conll", blocks[150:200])
    es = write(tmp_path / "data" / "es.conll", blocks[200:300])
    common = [
        f"data.train={{en: {{path: {en.parent}}}, es: {{path: {es}, weight: 0.5}}}}",
        "data.max_eval_samples=16",
        "data.test=null",
        "train.batch_tokens=384",
        "train.epochs=2",
        "train.save_every=3",
        "train.log_every=1",
        "model.dropout=0.0",
    ]
    straight = train(tmp_path, "straight", *common)
    want = losses(tmp_path / "straight")
    total = straight["global_steps"]
    assert total >= 8
    restore = kill_training_at_micro_batch(monkeypatch, 7)  # in step 7: after the step-6 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "resumed", *common)
    restore()
    progress = json.loads(
        (tmp_path / "resumed" / "checkpoints" / "step-00000006" / "progress.json").read_text()
    )
    assert progress["step_in_epoch"] > 0  # mid-epoch: the plan position is in the checkpoint
    # Other training data (one byte of one file) cannot resume the run: the plan depends on it.
    from raytag.trainer.config import ConfigError

    original = es.read_bytes()
    es.write_bytes(original.replace(b" O\n", b" O \n", 1))
    with pytest.raises(ConfigError, match=r"cannot resume run 'resumed': its training data differ"):
        train(tmp_path, "resumed", *common)
    es.write_bytes(original)
    res = train(tmp_path, "resumed", *common)
    assert res["resumed_from"] == "step-00000006"
    got = losses(tmp_path / "resumed")
    assert sorted(got) == sorted(want)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in sorted(want)]),
        torch.tensor([want[s] for s in sorted(want)]),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.slow
def test_english_and_spanish_with_weights_evaluated_per_language(tmp_path, blocks):
    """Two corpora with weights train; each language's evaluation set is in metrics.jsonl,
    results.json and the card's table. Real CoNLL-2002 Spanish from ../shared when present."""
    shared_es = ROOT.parent / "shared" / "data" / "conll2002" / "es"
    if shared_es.is_dir():
        es_blocks = sentences_of(shared_es / "train.txt")[:200]
        es_dev = sentences_of(shared_es / "validation.txt")[:40]
    else:  # a stand-in: the demo's sentences, as a second corpus
        es_blocks, es_dev = blocks[100:300], blocks[:40]
    en = write(tmp_path / "en" / "train.conll", blocks[:200])
    es = write(tmp_path / "es" / "train.conll", es_blocks)
    dev_es = write(tmp_path / "es" / "dev.conll", es_dev)
    res = train(
        tmp_path,
        "mix",
        f"data.train={{en: {{path: {en}, weight: 1.0}}, es: {{path: {es}, weight: 0.5}}}}",
        f"data.eval_sets.es={dev_es}",
        "data.eval_sets.en=builtin:demo/validation.txt",
        "data.max_eval_samples=40",
        "data.labels=[O, B-LOC, I-LOC, B-MISC, I-MISC, B-ORG, I-ORG, B-PER, I-PER]",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.batch_tokens=512",
    )
    run_dir = tmp_path / "mix"
    for name in ("validation", "en", "es", "test"):
        assert {"f1", "precision", "recall"} <= set(res[name]), name
    results = json.loads((run_dir / "results.json").read_text())
    assert {"en", "es"} <= set(results)
    assert set(results["train_data"]["corpora"]) == {"en", "es"}
    assert results["train_data"]["corpora"]["es"]["weight"] == 0.5
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in evals if r["type"] == "eval"} == {"validation", "en", "es"}
    card = (run_dir / "model" / "README.md").read_text()
    assert "### Results per evaluation set" in card
    table = card.split("### Results per evaluation set")[1].split("###")[0]
    for name in ("validation", "en", "es", "test"):
        assert f"| {name} |" in table, table
    assert "train (es, weight 0.5)" in card


@pytest.mark.slow
def test_the_schedule_counts_the_steps_each_epoch_really_has(tmp_path, blocks):
    """A corpus drawn at weight 0.5 gives each epoch its own shards, so epochs differ in steps:
    the run ends exactly at the end of its last epoch (not epochs x the first epoch's steps, which
    cut the last epoch short or spilled into one more), each epoch's windows trained on once."""
    en = write(tmp_path / "en.conll", blocks[:120])
    es = write(tmp_path / "es.conll", blocks[120:400])
    res = train(
        tmp_path,
        "epochs",
        f"data.train={{en: {{path: {en}, weight: 1.0}}, es: {{path: {es}, weight: 0.5}}}}",
        "data.max_eval_samples=16",
        "data.test=null",
        "train.epochs=3",
        "train.batch_tokens=384",
    )
    epochs = res["train_data"]["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and res["epochs"] == 3.0
    assert len({e["windows"] for e in epochs}) > 1  # the epochs really differ
    steps = json.loads(
        (
            tmp_path / "epochs" / "checkpoints" / f"step-{res['global_steps']:08d}" / "progress.json"
        ).read_text()
    )
    assert steps["epoch"] == 3 and steps["step_in_epoch"] == 0


def test_a_resumed_run_keeps_its_plan_whatever_the_new_epochs(tmp_path):
    """`batch_tokens: auto` depends on train.epochs, which a resume may raise: the checkpoint's plan
    (budget, pools, lanes) is used, so the saved position means the same windows."""
    from raytag.cluster.run import SoloGroup
    from raytag.trainer.config import load_config
    from raytag.trainer.loop import plan_run
    from raytag.trainer.run_data import load_data
    from tests.helpers import DEMO

    cfg = load_config(
        DEMO,
        [
            f"run.storage={tmp_path}",
            "train.batch_tokens=auto",
            "train.epochs=7",
            "data.max_train_samples=300",
        ],
    )
    data = load_data(cfg)
    fresh, _ = plan_run(cfg, data, SoloGroup(), None)
    stored = {"batch_tokens": fresh.batch_tokens + 96, "pool_batches": 3, "lanes": 2}
    resumed, _ = plan_run(cfg, data, SoloGroup(), stored)
    assert resumed.record == stored and resumed.record != fresh.record
    assert len(resumed.epoch(0).steps[0]) == 2  # one rank runs both lanes of each step
