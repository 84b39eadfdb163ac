"""Datasets as inputs (trainer/tables.py): the shared CoNLL-2003 sample written in the hub's
`conll2003` layout as a `save_to_disk` folder, Parquet, JSON Lines and CSV trains and scores as the
CoNLL file does; bad rows are one line naming the file, the row and the column."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import DEMO, ROOT, cli, run_records, train_demo

SHARED = ROOT.parent / "shared" / "data" / "conll2003"
TRAIN_SENTENCES, VALIDATION_SENTENCES = 300, 80

# The hub's conll2003 ClassLabel names, in the hub's order.
NER = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
POS = [
    '"', "''", "#", "$", "(", ")", ",", ".", ":", "``", "CC", "CD", "DT", "EX", "FW", "IN", "JJ", "JJR",
    "JJS", "LS", "MD", "NN", "NNP", "NNPS", "NNS", "NN|SYM", "PDT", "POS", "PRP", "PRP$", "RB", "RBR",
    "RBS", "RP", "SYM", "TO", "UH", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "WDT", "WP", "WP$", "WRB",
]  # fmt: skip
CHUNK = [
    "O", "B-ADJP", "I-ADJP", "B-ADVP", "I-ADVP", "B-CONJP", "I-CONJP", "B-INTJ", "I-INTJ", "B-LST",
    "I-LST", "B-NP", "I-NP", "B-PP", "I-PP", "B-PRT", "I-PRT", "B-SBAR", "I-SBAR", "B-UCP", "I-UCP",
    "B-VP", "I-VP",
]  # fmt: skip


def first_sentences(path: Path, n: int) -> tuple[str, list[list[list[str]]]]:
    """The text of the first `n` sentences of a CoNLL file (-DOCSTART- lines kept) and their rows."""
    out: list[str] = []
    sentences: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if current:
                sentences.append(current)
                current = []
                if len(sentences) == n:
                    break
        else:
            current.append(fields)
        out.append(line)
    return "\n".join(out) + "\n", sentences


def hub_layout(sentences: list[list[list[str]]], ner: list[str] = NER):
    """A `datasets.Dataset` in the hub's conll2003 layout: id, tokens, pos_tags, chunk_tags, ner_tags."""
    import datasets

    pos = POS + sorted({t[1] for s in sentences for t in s} - set(POS))
    chunk = CHUNK + sorted({t[2] for s in sentences for t in s} - set(CHUNK))
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "pos_tags": datasets.Sequence(datasets.ClassLabel(names=pos)),
            "chunk_tags": datasets.Sequence(datasets.ClassLabel(names=chunk)),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=ner)),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "id": [str(i) for i in range(len(sentences))],
            "tokens": [[t[0] for t in s] for s in sentences],
            "pos_tags": [[pos.index(t[1]) for t in s] for s in sentences],
            "chunk_tags": [[chunk.index(t[2]) for t in s] for s in sentences],
            "ner_tags": [[ner.index(t[3]) for t in s] for s in sentences],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared CoNLL-2003 sample as CoNLL files and in the hub's layout, several ways."""
    if not (SHARED / "train.txt").is_file():
        pytest.skip(f"{SHARED} is absent (../shared): no CoNLL-2003 sample to write as datasets")
    import datasets

    datasets.disable_progress_bars()
    d = tmp_path_factory.mktemp("tables")
    out: dict[str, Path] = {}
    splits = {}
    for split, n in (("train", TRAIN_SENTENCES), ("validation", VALIDATION_SENTENCES)):
        text, sentences = first_sentences(SHARED / f"{split}.txt", n)
        (d / f"{split}.txt").write_text(text, encoding="utf-8")
        out[f"{split}.conll"] = d / f"{split}.txt"
        splits[split] = hub_layout(sentences)
        splits[split].to_parquet(str(d / f"{split}.parquet"))
        out[f"{split}.parquet"] = d / f"{split}.parquet"
        # JSON Lines and CSV carry no features: their tags are strings
        named = [[t[3] for t in s] for s in sentences]
        plain = splits[split].remove_columns("ner_tags").add_column("ner_tags", named)
        plain.to_json(str(d / f"{split}.jsonl"))
        plain.to_csv(str(d / f"{split}.csv"), index=False)
        out[f"{split}.jsonl"], out[f"{split}.csv"] = d / f"{split}.jsonl", d / f"{split}.csv"
        # the same ClassLabel names in another order: the same sentences, the same model
        hub_layout(sentences, ner=NER[::-1]).to_parquet(str(d / f"{split}-reordered.parquet"))
        out[f"{split}.reordered"] = d / f"{split}-reordered.parquet"
    datasets.DatasetDict(splits).save_to_disk(str(d / "conll2003"))
    out["dict"] = d / "conll2003"
    out["root"] = d
    return out


def read(path: str | Path, name: str = "validation", **kw):
    from raytag.trainer.data import read_split

    args = {"tag_scheme": "auto", "strict": False, "max_sentences": None, "labels": None}
    return read_split(name, str(path), **{**args, **kw})


@pytest.mark.parametrize("form", ["dict", "dict:validation", "parquet", "jsonl", "csv", "reordered"])
def test_every_form_reads_as_the_conll_file(sample: dict[str, Path], form: str) -> None:
    conll = read(sample["validation.conll"])
    path = {
        "dict": sample["dict"],
        "dict:validation": f"{sample['dict']}:validation",
        "parquet": sample["validation.parquet"],
        "jsonl": sample["validation.jsonl"],
        "csv": sample["validation.csv"],
        "reordered": sample["validation.reordered"],
    }[form]
    got = read(path)
    assert len(got.sentences) == VALIDATION_SENTENCES
    assert got.words == conll.words
    assert got.tags == conll.tags
    assert [s.line for s in got.sentences] == list(range(VALIDATION_SENTENCES))  # rows, as dataset[N]


def test_save_to_disk_picks_the_split_named_like_the_key_or_after_the_colon(sample: dict[str, Path]) -> None:
    from raytag.trainer.tables import TableError

    assert read(sample["dict"], name="train").words == read(sample["train.conll"]).words
    assert read(f"{sample['dict']}:train", name="validation").words == read(sample["train.conll"]).words
    with pytest.raises(TableError, match=r"no split 'dev' .*the dataset has train, validation"):
        read(sample["dict"], name="dev")
    with pytest.raises(TableError, match=r"':test' names a split, but this is no save_to_disk"):
        read(f"{sample['validation.parquet']}:test")


def test_label_set_is_raytags_own_whatever_the_classlabel_order(
    sample: dict[str, Path], tmp_path: Path
) -> None:
    from raytag.trainer.config import load_config
    from raytag.trainer.model import load_tokenizer
    from raytag.trainer.run_data import tokenizer_fingerprint, train_spec
    from raytag.trainer.shards import prepare

    tok = tokenizer_fingerprint(load_tokenizer("builtin:tiny-xlmr"))
    found = {}
    for form in ("train.conll", "train.parquet", "train.reordered"):
        cfg = load_config(DEMO, [f"data.train={sample[form]}", f"data.prepared={tmp_path / form}"])
        found[form] = prepare(train_spec(cfg), tok)
    labels = found["train.conll"].labels
    assert labels[0] == "O" and labels[1:] == sorted(labels[1:], key=lambda t: (t[2:], t[0]))
    for form in ("train.parquet", "train.reordered"):
        assert found[form].labels == labels
        assert found[form].lengths.tolist() == found["train.conll"].lengths.tolist()
        assert found[form].manifest["sentences"] == TRAIN_SENTENCES


def test_runs_from_the_hub_layout_train_and_score_as_the_conll_run(
    sample: dict[str, Path], tmp_path: Path
) -> None:
    """Same sentences, same seed: the same loss at every step, the same validation loss and F1 at
    every evaluation (the windows, their labels and their order are the same)."""
    runs = {
        "conll": [f"data.train={sample['train.conll']}", f"data.validation={sample['validation.conll']}"],
        "disk": [f"data.train={sample['dict']}", f"data.validation={sample['dict']}"],
        "parquet": [
            f"data.train={sample['train.parquet']}",
            f"data.validation={sample['validation.parquet']}",
        ],
    }
    results, curves = {}, {}
    for name, data in runs.items():
        results[name] = train_demo(
            tmp_path,
            name,
            *data,
            "data.test=null",
            "train.epochs=2",
            "train.log_every=1",
            "run.tensorboard=false",
        )
        records = run_records(tmp_path / name)
        curves[name] = {
            "train": [(r["step"], r["loss"]) for r in records if r.get("type") == "train"],
            "eval": [(r["step"], r["loss"], r["f1"]) for r in records if r.get("type") == "eval"],
        }
    assert len(curves["conll"]["train"]) >= 20 and len(curves["conll"]["eval"]) == 2
    for name in ("disk", "parquet"):
        assert curves[name] == curves["conll"], name
        assert results[name]["validation"]["f1"] == results["conll"]["validation"]["f1"]
        assert results[name]["labels"] == results["conll"]["labels"]


def test_prepared_shards_follow_the_datasets_content(sample: dict[str, Path], tmp_path: Path) -> None:
    """An unchanged dataset is reused; a changed one is prepared again."""
    import datasets

    from raytag.trainer.config import load_config
    from raytag.trainer.model import load_tokenizer
    from raytag.trainer.run_data import tokenizer_fingerprint, train_spec
    from raytag.trainer.shards import prepare

    tok = tokenizer_fingerprint(load_tokenizer("builtin:tiny-xlmr"))
    folder = tmp_path / "ds"
    datasets.load_from_disk(str(sample["dict"])).save_to_disk(str(folder))
    cfg = load_config(DEMO, [f"data.train={folder}", f"data.prepared={tmp_path / 'prepared'}"])
    first = prepare(train_spec(cfg), tok)
    again = prepare(train_spec(cfg), tok)
    assert again.reused and again.fingerprint == first.fingerprint
    changed = datasets.load_from_disk(str(sample["dict"]))
    changed["train"] = changed["train"].select(range(TRAIN_SENTENCES - 1))
    changed.save_to_disk(str(tmp_path / "ds2"))
    folder.rename(tmp_path / "old")
    (tmp_path / "ds2").rename(folder)
    third = prepare(train_spec(cfg), tok)
    assert not third.reused and third.fingerprint != first.fingerprint
    assert third.manifest["sentences"] == TRAIN_SENTENCES - 1
    # the columns read are part of what was prepared
    other = load_config(
        DEMO,
        [f"data.train={folder}", f"data.prepared={tmp_path / 'prepared'}", "data.columns.tags=chunk_tags"],
    )
    assert prepare(train_spec(other), tok).fingerprint != third.fingerprint


def _bad(tmp_path: Path, rows: dict, name: str = "bad.parquet", names: list[str] | None = NER) -> Path:
    import datasets

    tags = datasets.ClassLabel(names=names) if names else datasets.Value("string")
    features = datasets.Features(
        {"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": datasets.Sequence(tags)}
    )
    path = tmp_path / name
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_bad_rows_name_the_file_the_row_and_the_column(tmp_path: Path) -> None:
    import datasets

    from raytag.trainer.tables import Columns, TableError

    datasets.disable_progress_bars()
    good = [["EU", "rejects", "it"], ["Peter", "Blackburn"]]
    path = _bad(tmp_path, {"tokens": good, "ner_tags": [[3, 0, 0], [1, 2]]})
    with pytest.raises(TableError) as e:
        read(path, name="train", labels=["O", "B-ORG", "I-ORG"])
    assert (
        str(e.value)
        == f"{path}: row 1, column 'ner_tags': tag 0: label 'B-PER' is not in the label set (O, B-ORG, I-ORG)"
    )
    with pytest.raises(TableError) as e:
        read(path, columns=Columns(tags="labels"))
    assert str(e.value) == (
        f"{path}: column 'labels': no such column (the columns are tokens, ner_tags); "
        "name yours with data.columns.tags"
    )
    # a tag id outside the ClassLabel: ids written by hand into the Parquet file
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = pa.array([[3, 0, 0], [1, 9]], type=pa.list_(pa.int64()))
    pq.write_table(table.set_column(1, "ner_tags", ids).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(TableError) as e:
        read(path)
    assert (
        str(e.value)
        == f"{path}: row 1, column 'ner_tags': item 1: tag id 9 is outside the ClassLabel's 9 names"
    )
    path = _bad(tmp_path, {"tokens": good, "ner_tags": [[3, 0, 0], [1]]}, "short.parquet")
    with pytest.raises(TableError) as e:
        read(path)
    assert str(e.value) == f"{path}: row 1, column 'ner_tags': 1 tags for 2 tokens in column 'tokens'"
    path = _bad(
        tmp_path, {"tokens": good, "ner_tags": [["O", "O", "O"], ["B-PER", "X-PER"]]}, "s.parquet", None
    )
    with pytest.raises(TableError) as e:
        read(path)
    assert str(e.value) == (
        f"{path}: row 1, column 'ner_tags': item 1: tag 'X-PER' is not in the IOB1/IOB2 scheme "
        "(expected O, B-TYPE or I-TYPE)"
    )
    plain = tmp_path / "ids.jsonl"
    plain.write_text('{"tokens": ["EU"], "ner_tags": [3]}\n')
    with pytest.raises(TableError, match=r"ids.jsonl: column 'ner_tags': tags are integer ids but the input"):
        read(plain)
    csv = tmp_path / "x.csv"
    csv.write_text(
        'tokens,ner_tags\n"[\'EU\' \'x\']","[\'B-ORG\' \'O\']"\n"EU rejects","B-ORG O"\n"a b","O ..."\n'
    )
    assert read(csv, max_sentences=2).words == [("EU", "x"), ("EU", "rejects")]  # row 2 is not read
    csv.write_text("tokens,ner_tags\n\"['a' 'b']\",\"['O' ... 'O']\"\n")
    with pytest.raises(TableError, match=r"x.csv: row 0, column 'ner_tags': numpy's shortened print"):
        read(csv)


def test_empty_rows_are_counted_not_sentences(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _bad(tmp_path, {"tokens": [["EU"], [], ["Peter"]], "ner_tags": [[3], [], [1]]})
    split = read(path)
    assert split.words == [("EU",), ("Peter",)] and [s.line for s in split.sentences] == [0, 2]
    assert "1 row(s) with no tokens are no sentences" in caplog.text


def test_a_bad_dataset_is_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    path = _bad(tmp_path, {"tokens": [["EU", "x"], ["Peter"]], "ner_tags": [[3, 0], [1, 2]]})
    res = cli("prepare", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.train={path}",
              f"run.storage={tmp_path / 'runs'}")  # fmt: skip
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"raytag: error: {path}: row 1, column 'ner_tags': 2 tags for 1 tokens in column 'tokens'"
    ), res.stderr


def test_the_hub_offline_is_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        res = cli("prepare", "--config", str(ROOT / "configs" / "demo.yaml"), "data.train=hf:conll2003",
                  f"run.storage={tmp_path / 'runs'}")  # fmt: skip
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if "raytag: error" in line]
    assert len(lines) == 1 and res.stderr.strip().endswith(lines[0]), res.stderr
    assert lines[0].startswith("raytag: error: hf:conll2003:train: cannot load it from the Hugging Face hub")
    assert "save_to_disk(PATH)" in lines[0] and "name that path instead" in lines[0]


def test_hub_names_parse() -> None:
    from raytag.trainer.tables import TableError, parse_hub

    assert parse_hub("hf:conll2003", "train") == ("conll2003", None, "train")
    assert parse_hub("hf:conll2003:test", "train") == ("conll2003", None, "test")
    assert parse_hub("hf:wikiann:en", "validation") == ("wikiann", "en", "validation")
    assert parse_hub("hf:wikiann:en:test", "train") == ("wikiann", "en", "test")
    assert parse_hub("hf:user/ds:train[:10%]", "train") == ("user/ds", None, "train[:10%]")
    with pytest.raises(TableError):
        parse_hub("hf:", "train")


def test_columns_are_checked_config_keys() -> None:
    from raytag.trainer.config import ConfigError, load_config

    cfg = load_config(None, ["data.columns.tokens=words", "data.columns.tags=labels"])
    assert (cfg.data.columns.tokens, cfg.data.columns.tags) == ("words", "labels")
    with pytest.raises(ConfigError, match="data.columns.tag'"):
        load_config(None, ["data.columns.tag=labels"])
