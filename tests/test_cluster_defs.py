"""The shipped cluster definitions: the Ray cluster-launcher config and the KubeRay RayJob.

Both files are loaded the way an installed raytag sees them (package data of
``raytag.cluster``). The AWS config is checked with the JSON schema that ships inside the
installed ``ray`` package, by the same two calls ``ray up`` makes before it touches AWS.
"""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_PKG = "raytag.cluster"
AWS_YAML = "aws.yaml"
RAYJOB_YAML = "kuberay-rayjob.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

# An AWS access key id (long-term AKIA, temporary ASIA) or the name of the secret-key setting.
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET_NAME = re.compile(r"aws_secret_access_key", re.IGNORECASE)


def _text(name: str) -> str:
    return files(CLUSTER_PKG).joinpath(name).read_text(encoding="utf-8")


def _load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(_text(name)) if d is not None]
    assert len(docs) == 1, f"{name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _validate_like_ray_up(config: dict[str, Any]) -> dict[str, Any]:
    """Validate as ``ray up`` does before any cloud call; return the prepared config.

    First the user's file alone against ray-schema.json (which forbids unknown keys), then
    Ray's own ``prepare_config`` (merge with the provider defaults, merge setup commands)
    and ``validate_config`` (the schema again plus cross-field rules). Raises
    ``jsonschema.ValidationError`` or ``ValueError``.
    """
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validate(copy.deepcopy(config), schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _installed_ray_image_tag() -> str:
    return f"rayproject/ray:{ray.__version__}-py311-gpu"


# ---------------------------------------------------------------------------------------------
# Every shipped YAML parses.


def test_every_shipped_cluster_yaml_parses():
    names = sorted(p.name for p in files(CLUSTER_PKG).iterdir() if p.name.endswith(".yaml"))
    assert AWS_YAML in names and RAYJOB_YAML in names, names
    for name in names:
        assert isinstance(_load(name), dict), name


# ---------------------------------------------------------------------------------------------
# cluster/aws.yaml: schema.


def test_ray_schema_ships_with_installed_ray():
    assert RAY_SCHEMA.is_file(), RAY_SCHEMA
    schema = json.loads(RAY_SCHEMA.read_text(encoding="utf-8"))
    # The property this test file relies on: unknown top-level keys are errors.
    assert schema.get("additionalProperties") is False


def test_aws_config_passes_ray_schema_and_ray_up_validation():
    _validate_like_ray_up(_load(AWS_YAML))


def _misspell_top_level_key(c: dict[str, Any]) -> None:
    c["max_worker"] = c.pop("max_workers")


def _misspell_node_type_key(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_workers"]["min_worker"] = 0


def _drop_node_type_resources(c: dict[str, Any]) -> None:
    del c["available_node_types"]["gpu_workers"]["resources"]


def _gpu_count_as_string(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_workers"]["resources"]["GPU"] = "4"


def _misspell_docker_key(c: dict[str, Any]) -> None:
    c["docker"]["imag"] = c["docker"].pop("image")


def _head_type_not_defined(c: dict[str, Any]) -> None:
    c["head_node_type"] = "no_such_type"


@pytest.mark.parametrize(
    "break_it",
    [
        _misspell_top_level_key,
        _misspell_node_type_key,
        _drop_node_type_resources,
        _gpu_count_as_string,
        _misspell_docker_key,
        _head_type_not_defined,
    ],
)
def test_validator_rejects_a_broken_copy(break_it):
    # Proves the check above can fail: the same validator on a damaged copy must raise.
    config = _load(AWS_YAML)
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_like_ray_up(config)


# ---------------------------------------------------------------------------------------------
# cluster/aws.yaml: what it means.


def test_aws_head_runs_no_tasks():
    config = _load(AWS_YAML)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, head["resources"]
    assert not head["resources"].get("GPU")


def test_aws_has_an_autoscaling_gpu_worker_type():
    config = _load(AWS_YAML)
    types = config["available_node_types"]
    gpu = types["gpu_workers"]
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["resources"]["CPU"] >= 1
    assert gpu["node_config"]["InstanceType"] == "g5.12xlarge"
    assert gpu["resources"]["GPU"] == 4  # g5.12xlarge: 4x A10G
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= config["max_workers"]
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["cache_stopped_nodes"] is False


def test_aws_every_node_has_an_instance_profile():
    # S3 access comes from instance roles; Ray gives only the head a default one.
    for name, node_type in _load(AWS_YAML)["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), name


def _install_index(commands: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    hits = [i for i, cmd in enumerate(commands) if "pip install" in cmd and rx.search(cmd)]
    assert hits, f"no `pip install` matching {pattern!r} in {commands}"
    return hits[0]


@pytest.mark.parametrize("node_kind", ["head_setup_commands", "worker_setup_commands"])
def test_aws_setup_installs_torch_before_raytag(node_kind):
    # Checked on the prepared config: Ray prepends setup_commands to each node kind's own.
    commands = _validate_like_ray_up(_load(AWS_YAML))[node_kind]
    torch_at = _install_index(commands, r"\btorch\b")
    raytag_at = _install_index(commands, r"raytag")
    assert torch_at < raytag_at, commands
    assert "raytag" not in commands[torch_at], commands[torch_at]


def test_aws_syncs_the_checkout_and_the_auth_token():
    mounts = _load(AWS_YAML)["file_mounts"]
    assert mounts["~/raytag"] == "."
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_aws_ray_start_uses_token_auth_and_a_private_dashboard():
    config = _load(AWS_YAML)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert config["head_start_ray_commands"][0] == "ray stop"
    assert config["worker_start_ray_commands"][0] == "ray stop"
    assert "ray start --head" in head and "--address=$RAY_HEAD_IP:6379" in worker
    # A worker only joins a token-protected head with RAY_AUTH_MODE=token set.
    assert "RAY_AUTH_MODE=token ray start" in head
    assert "RAY_AUTH_MODE=token ray start" in worker
    assert "0.0.0.0" not in head


def test_aws_image_matches_installed_ray():
    assert _load(AWS_YAML)["docker"]["image"] == _installed_ray_image_tag()


def test_aws_config_holds_no_credentials():
    text = _text(AWS_YAML)
    assert not AWS_KEY_ID.search(text)
    assert not AWS_SECRET_NAME.search(text)


# ---------------------------------------------------------------------------------------------
# cluster/kuberay-rayjob.yaml.


def _ray_containers(job: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    workers = {g["groupName"]: g["template"]["spec"]["containers"] for g in spec["workerGroupSpecs"]}
    return {"head": head, **workers}


def test_rayjob_kind_and_lifecycle():
    job = _load(RAYJOB_YAML)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_rayjob_entrypoint_runs_the_trainer():
    entrypoint = " ".join(_load(RAYJOB_YAML)["spec"]["entrypoint"].split())
    assert entrypoint.startswith("python trainer/main.py --config configs/"), entrypoint
    assert "run.storage=s3://" in entrypoint
    assert "scaling.use_gpu=true" in entrypoint


def test_rayjob_gpu_workers_ask_for_gpus():
    job = _load(RAYJOB_YAML)
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    group = groups["gpu-workers"]
    assert group["replicas"] >= 1
    for container in group["template"]["spec"]["containers"]:
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, container["name"]
    # One Ray Train worker per GPU pod.
    entrypoint = job["spec"]["entrypoint"]
    assert f"scaling.num_workers={group['replicas']}" in entrypoint


def test_rayjob_head_takes_no_tasks():
    params = _load(RAYJOB_YAML)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("num-cpus") == "0"


def test_rayjob_containers_get_s3_credentials_from_the_secret():
    for group, containers in _ray_containers(_load(RAYJOB_YAML)).items():
        for container in containers:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert "raytag-s3" in refs, (group, container["name"])


def test_rayjob_images_match_installed_ray():
    job = _load(RAYJOB_YAML)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    for group, containers in _ray_containers(job).items():
        for container in containers:
            assert container["image"] == _installed_ray_image_tag(), (group, container["image"])


def test_rayjob_holds_no_credentials():
    text = _text(RAYJOB_YAML)
    assert not AWS_KEY_ID.search(text)
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert not [d for d in docs if d.get("kind") == "Secret"], "a Secret with literal values"
    job = docs[0]
    # Credentials never in the runtime env: the dashboard and job API show it to anyone.
    runtime_env = job["spec"].get("runtimeEnvYAML", "")
    assert "AWS_" not in runtime_env, runtime_env
    # ... nor as literal `env` values in any container.
    for group, containers in _ray_containers(job).items():
        for container in containers:
            for env in container.get("env", []):
                if env["name"].upper().startswith("AWS_"):
                    assert "value" not in env, (group, env["name"])
