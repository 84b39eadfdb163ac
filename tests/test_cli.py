"""The command line: user errors are one line and exit 2, no traceback; --help; mode choice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raytag.trainer.config import load_config
from tests.helpers import MAIN, ROOT, cli


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("raytag: error:")]
    assert len(errors) == 1, r.stderr
    for frag in fragments:
        assert frag in errors[0], errors[0]


def test_help_lists_keys():
    r = cli("--help")
    assert r.returncode == 0
    for key in ("data.train", "train.max_steps", "run.storage", "scaling.num_workers", "predict"):
        assert key in r.stdout
    # Each key's meaning is under it, indented.
    lines = r.stdout.splitlines()
    at = lines.index("  train.learning_rate = 5e-05")
    assert lines[at + 1].startswith("      Peak learning rate of AdamW"), lines[at : at + 3]


def test_every_config_key_says_what_it_means():
    """A key added without a docstring under its field (in trainer/config.py) fails here."""
    import dataclasses
    import typing

    from raytag.trainer.config import Config, describe_keys, key_docs

    docs = key_docs()
    hints = typing.get_type_hints(Config)
    keys = [
        f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(hints[s.name])
    ]
    missing = [k for k in keys if len(docs.get(k, "")) < 10]
    assert not missing, f"config keys without a docstring under their field: {missing}"
    assert docs["train.learning_rate"].startswith("Peak learning rate of AdamW")
    # Wrapped to the width asked for, every meaning line indented under its key.
    text = describe_keys(width=60)
    meaning = [ln for ln in text.splitlines() if ln.startswith("      ")]
    assert meaning and all(len(ln) <= 60 for ln in meaning)
    assert "\n".join(ln.strip() for ln in meaning).count("Peak learning rate of AdamW") == 1


def test_predict_entities_of_conll_input_is_a_one_line_error(tmp_path):
    src = tmp_path / "in.conll"
    src.write_text("Siemens\n.\n", encoding="utf-8")
    # Refused before any model is loaded: the folder need not exist.
    r = cli(
        "predict", "--model", str(tmp_path / "nomodel"), "--input", str(src), "--output-format", "entities"
    )
    assert_one_line_error(r, "--output-format entities needs --format text")
    r = cli("predict", "--help")
    assert r.returncode == 0 and "--output-format" in r.stdout and '"start"' in r.stdout


def test_unknown_key_suggests_closest(tmp_path):
    r = cli("--config", "configs/demo.yaml", "train.learnig_rate=1e-3", f"run.storage={tmp_path}")
    assert_one_line_error(r, "unknown key 'train.learnig_rate'", "did you mean 'train.learning_rate'")


def test_bad_value_names_key(tmp_path):
    r = cli("--config", "configs/demo.yaml", "train.epochs=lots", f"run.storage={tmp_path}")
    assert_one_line_error(r, "train.epochs", "expected a number")


def test_missing_and_malformed_data_files_name_file_and_line(tmp_path):
    r = cli("--config", "configs/demo.yaml", f"data.train={tmp_path / 'nope.txt'}", f"run.storage={tmp_path}")
    assert_one_line_error(r, "nope.txt", "not found")
    bad = tmp_path / "bad.txt"
    bad.write_text("EU B-ORG\nrejects O\n\nGerman\n")
    r = cli("--config", "configs/demo.yaml", f"data.train={bad}", f"run.storage={tmp_path}")
    assert_one_line_error(r, f"{bad}:4:", "expected at least 2 columns")
    dev = tmp_path / "dev.txt"
    dev.write_text("Bonn B-LOC\nis O\nfine O\n\nAcme B-COMPANY\n")
    r = cli("--config", "configs/demo.yaml", f"data.validation={dev}", f"run.storage={tmp_path}")
    assert_one_line_error(r, f"{dev}:5:", "B-COMPANY")


def test_print_config_resolves_overrides():
    r = cli("--config", "configs/demo.yaml", "--print-config", "train.seed=3")
    assert r.returncode == 0 and "seed: 3" in r.stdout


def _python_without_raytag() -> str | None:
    """A Python outside the venv that lacks raytag but has what `--help` imports (yaml, boto3)."""
    import shutil

    for name in ("python3", "python"):
        exe = shutil.which(
            name,
            path=os.pathsep.join(
                p
                for p in os.environ.get("PATH", "").split(os.pathsep)
                if Path(sys.executable).parent != Path(p)
            ),
        )
        if not exe:
            continue
        probe = subprocess.run(
            [
                exe,
                "-c",
                "import yaml, boto3\ntry:\n import raytag.trainer\nexcept ImportError:\n print('ok')",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.stdout.strip() == "ok":
            return exe
    return None


def test_main_works_from_a_checkout_without_install(tmp_path):
    # trainer/main.py maps the folders onto the raytag namespace itself when raytag is not installed.
    exe = _python_without_raytag()
    if exe is None:
        pytest.skip("no Python without raytag (but with yaml and boto3) on PATH to try a bare checkout with")
    r = subprocess.run([exe, str(MAIN), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "data.train" in r.stdout


def test_local_storage_refused_on_a_multi_node_cluster(monkeypatch):
    import ray

    from raytag.launcher import ray_launcher
    from raytag.trainer.config import ConfigError

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["run.storage=/tmp/x"])
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(ConfigError, match="cannot hold a run on a cluster of 2 nodes"):
        ray_launcher._check_storage_fits_cluster(cfg)
    s3 = load_config(ROOT / "configs" / "demo.yaml", ["run.storage=s3://b/p"])
    ray_launcher._check_storage_fits_cluster(s3)  # fine on S3
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    ray_launcher._check_storage_fits_cluster(cfg)  # fine on one node


def test_log_lines_never_show_the_secret_key():
    code = (
        "import logging\n"
        "from raytag.launcher.logs import setup_logging\n"
        "from raytag.trainer.progress import ProgressView\n"
        "setup_logging()\n"
        "logging.getLogger('raytag').info('endpoint said: bad key %s', 'Sekr3t-Value-x9')\n"
        "import raytag.trainer.progress as p\n"
        "p.sys.stderr.isatty = lambda: True\n"
        "view = ProgressView(4, 0, True, 1)  # the terminal bar reroutes logging: still filtered\n"
        "logging.getLogger('raytag').info('during the bar: Sekr3t-Value-x9')\n"
        "view.close()\n"
    )
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "Sekr3t-Value-x9"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "endpoint said: bad key ***" in r.stderr and "during the bar: ***" in r.stderr
    assert "Sekr3t-Value-x9" not in r.stderr + r.stdout
