"""Typed config: YAML + overrides, validation with clear errors, shipped configs parse."""

from __future__ import annotations

import pytest

from raytag.trainer.config import ConfigError, load_config
from tests.helpers import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert cfg.run.name


def test_overrides_typed_and_nested(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n  epochs: 2\n")
    cfg = load_config(
        f,
        [
            "train.seed=7",
            "data.max_train_samples=100",
            "train.learning_rate=2e-5",
            "data.eval_sets.extra=x.txt",
            "scaling.use_gpu=true",
        ],
    )
    assert cfg.train.learning_rate == 2e-5 and cfg.train.seed == 7 and cfg.train.epochs == 2
    assert cfg.data.max_train_samples == 100 and cfg.data.eval_sets == {"extra": "x.txt"}
    assert cfg.scaling.use_gpu is True


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'"
    ):
        load_config(None, ["train.learnig_rate=1e-4"])
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'trian'; did you mean 'train'"):
        load_config(f)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=abc", "train.epochs: expected a number"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("train.max_steps=0", "train.max_steps: must be > 0"),
        ("data.tag_scheme=bio", "data.tag_scheme: 'bio' is not one of"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu: expected true or false"),
        ("run.name=a/b", "run.name: must be a plain name"),
        ("train.zero_stage=4", "train.zero_stage: must be 0, 1, 2 or 3"),
        ("train.head_lr_scale=0", r"train.head_lr_scale: must be > 0, got 0"),
        ("train.layer_lr_decay=1.5", r"train.layer_lr_decay: must be in \(0, 1\], got 1.5"),
        ("nokey", "expected dotted.key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=rf"{f}:\d+: invalid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_head_and_layer_rates_refuse_a_deepspeed_optimizer():
    with pytest.raises(ConfigError, match="train.head_lr_scale: sets raytag's AdamW parameter groups.*set "):
        load_config(None, ["train.head_lr_scale=10", "train.deepspeed={optimizer: {type: Adam}}"])
    with pytest.raises(ConfigError, match="train.layer_lr_decay: sets raytag's AdamW parameter groups"):
        load_config(None, ["train.head_lr_scale=1", "train.deepspeed={optimizer: {type: Adam}}"])
    own = load_config(
        None, ["train.head_lr_scale=1", "train.layer_lr_decay=1", "train.deepspeed={optimizer: {type: Adam}}"]
    )
    assert own.train.deepspeed["optimizer"]["type"] == "Adam"
