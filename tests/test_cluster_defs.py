"""The shipped cluster definitions: the Ray cluster-launcher config, the KubeRay RayJob and the image.

Both YAML files are loaded the way an installed raytag sees them (package data of
``raytag.cluster``). The AWS config is checked with the JSON schema that ships inside the
installed ``ray`` package, by the same two calls ``ray up`` makes before it touches AWS.
cluster/Dockerfile (read from the checkout: it is not package data) is parsed: both definitions
must run the image it documents, built on the installed Ray's GPU image, with torch and raytag
installed at the pinned versions of cluster/constraints.txt.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_PKG = "raytag.cluster"
AWS_YAML = "aws.yaml"
RAYJOB_YAML = "kuberay-rayjob.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "cluster" / "constraints.txt"

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
    spot = types["gpu_spot_workers"]  # an elastic run's spot nodes
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert spot["min_workers"] == 0 < spot["max_workers"]
    assert gpu["max_workers"] + spot["max_workers"] <= config["max_workers"]
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["cache_stopped_nodes"] is False


def test_aws_every_node_has_an_instance_profile():
    # S3 access comes from instance roles; Ray gives only the head a default one.
    for name, node_type in _load(AWS_YAML)["available_node_types"].items():
        assert node_type["node_config"].get("IamInstanceProfile"), name


@pytest.mark.parametrize("node_kind", ["head_setup_commands", "worker_setup_commands"])
def test_aws_nodes_install_nothing(node_kind):
    # torch, DeepSpeed, Ray and raytag come from the image; a node that pip-installs at start-up
    # could run other code than the image's (checked on the prepared config: Ray prepends
    # setup_commands to each node kind's own and may add defaults).
    commands = _validate_like_ray_up(_load(AWS_YAML))[node_kind]
    assert not [c for c in commands if "pip install" in c or "raytag" in c], commands


def test_aws_mounts_only_the_auth_token():
    # No checkout is synced to the nodes: they run the image's raytag.
    config = _load(AWS_YAML)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert not config.get("cluster_synced_files")


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


def test_aws_runs_the_raytag_image():
    assert _load(AWS_YAML)["docker"]["image"] == _documented_image()


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
    # One Ray Train worker per GPU pod: an elastic range from the on-demand pods to all of them.
    spot = groups["gpu-spot-workers"]
    assert spot["minReplicas"] == 0 < spot["maxReplicas"]
    assert spot["template"]["spec"]["nodeSelector"]
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    entrypoint = job["spec"]["entrypoint"]
    assert (
        f"'scaling.num_workers=[{group['replicas']},{group['replicas'] + spot['maxReplicas']}]'" in entrypoint
    )


def test_rayjob_head_takes_no_tasks():
    params = _load(RAYJOB_YAML)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("num-cpus") == "0"


def test_rayjob_containers_get_s3_credentials_from_the_secret():
    for group, containers in _ray_containers(_load(RAYJOB_YAML)).items():
        for container in containers:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert "raytag-s3" in refs, (group, container["name"])


def test_rayjob_runs_the_raytag_image_of_the_installed_ray():
    job = _load(RAYJOB_YAML)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    containers = _ray_containers(job)
    assert set(containers) == {"head", "gpu-workers", "gpu-spot-workers"}, containers
    for group, group_containers in containers.items():
        for container in group_containers:
            assert container["image"] == _documented_image(), (group, container["image"])


def test_rayjob_working_dir_is_the_images_copy():
    runtime_env = yaml.safe_load(_load(RAYJOB_YAML)["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _workdir()
    # The entrypoint's config file is in that folder.
    entrypoint = _load(RAYJOB_YAML)["spec"]["entrypoint"].split()
    config = entrypoint[entrypoint.index("--config") + 1]
    assert config.split("/")[0] + "/" in _copied_sources(), config


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


# ---------------------------------------------------------------------------------------------
# cluster/Dockerfile: the image both definitions run.


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def _instructions() -> list[Instruction]:
    """The Dockerfile's instructions in order, as Docker reads them: comment lines dropped (also
    inside a continuation), lines ending in a backslash joined with the next."""
    out: list[Instruction] = []
    pending: str | None = None
    start = 0
    for number, raw in enumerate(DOCKERFILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and pending is None):
            continue
        if pending is None:
            pending, start = "", number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, args = pending.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        pending = None
    assert pending is None, f"{DOCKERFILE}: the last instruction ends in a backslash"
    return out


def _documented_image() -> str:
    """The image name the Dockerfile's build and push commands give."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    built = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.$", text, re.MULTILINE)
    pushed = re.findall(r"docker push (\S+)$", text, re.MULTILINE)
    assert len(built) == 1 and pushed == built, (built, pushed)
    return built[0]


def _workdir() -> str:
    workdirs = [i.args for i in _instructions() if i.keyword == "WORKDIR"]
    assert len(workdirs) == 1, workdirs
    return workdirs[0]


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY; flags such as --chown dropped."""
    out = []
    for ins in _instructions():
        if ins.keyword == "COPY":
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            out.append((words[:-1], words[-1]))
    return out


def _copied_sources() -> set[str]:
    return {src for sources, _ in _copies() for src in sources}


_PIP_VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url"}


@dataclass(frozen=True)
class PipInstall:
    line: int
    requirements: list[str]
    options: dict[str, str]


def _pip_installs() -> list[PipInstall]:
    """Every `pip install` of every RUN, in order, with its requirements and valued options."""
    out = []
    for ins in _instructions():
        if ins.keyword != "RUN":
            continue
        for command in ins.args.split("&&"):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            requirements, options, rest = [], {}, iter(words[2:])
            for word in rest:
                if word in _PIP_VALUE_OPTIONS:
                    options[word] = next(rest)
                elif not word.startswith("-"):
                    requirements.append(word)
            out.append(PipInstall(ins.line, requirements, options))
    return out


def _makefile_torch() -> str:
    match = re.search(r"^TORCH\s*\?=\s*(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, "no TORCH ?= ... in the Makefile"
    return match.group(1)


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_builds_on_the_installed_rays_gpu_image():
    froms = [i.args for i in _instructions() if i.keyword == "FROM"]
    assert froms == [_installed_ray_image_tag()]


def test_dockerfile_installs_pinned_torch_first_then_raytag():
    installs = _pip_installs()
    torch_installs = [p for p in installs if any(re.match(r"torch\b", r) for r in p.requirements)]
    raytag_installs = [p for p in installs if "." in p.requirements]
    assert len(torch_installs) == 1 and len(raytag_installs) == 1, installs
    torch_install, raytag_install = torch_installs[0], raytag_installs[0]
    # torch alone and first, pinned as the Makefile pins it: pip never picks a torch build itself.
    assert torch_install.requirements == [_makefile_torch()]
    assert installs.index(torch_install) < installs.index(raytag_install)
    # raytag from the copied checkout ("." is the WORKDIR), every dependency at its pinned
    # version, and Ray at the image's (the client's) version.
    assert raytag_install.options.get("--constraint") == "cluster/constraints.txt"
    assert f"ray[default,train]=={ray.__version__}" in raytag_install.requirements
    copies_before = [c for c in _instructions() if c.keyword == "COPY" and c.line < raytag_install.line]
    assert len(copies_before) == len(_copies()), "everything is copied before raytag is installed"


def test_dockerfile_copies_every_package_folder_into_its_workdir():
    pyproject = _pyproject()
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    needed = {"pyproject.toml", pyproject["project"]["readme"], "configs/"} | {f"{d}/" for d in package_dirs}
    sources = _copied_sources()
    assert needed <= sources, needed - sources
    for sources_, dest in _copies():  # each folder to the same place under the WORKDIR
        for src in sources_:
            assert dest == (src if src.endswith("/") else "./"), (src, dest)
    assert _workdir() == "/home/ray/raytag"


def test_dockerignore_lets_in_every_copied_path():
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the context is an allowlist: everything else stays out (.venv, runs/)"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    for src in _copied_sources():
        assert src.rstrip("/").split("/")[0] in allowed, src


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{CONSTRAINTS.name}: {line!r} is not NAME==VERSION"
            key = canonicalize_name(name)
            assert key not in pins, f"{CONSTRAINTS.name}: {name} pinned twice"
            pins[key] = version
    return pins


def test_constraints_pin_every_dependency_within_its_range():
    pins = _constraints()
    requires = [Requirement(r) for r in importlib.metadata.requires("raytag") or []]
    runtime = [r for r in requires if r.marker is None]  # the extras (dev, bench) stay out of the image
    assert {canonicalize_name(r.name) for r in runtime} == set(pins), "one pin per dependency"
    for req in runtime:
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), (str(req), pins[req.name])
    assert f"torch=={pins['torch']}" == _makefile_torch()
    assert pins["ray"] == ray.__version__


def test_definitions_run_the_image_the_dockerfile_documents():
    # The one check that ties the three files: a definition that went back to the stock Ray image
    # (or another tag) fails here, as does a Dockerfile documenting another name.
    image = _documented_image()
    name, _, tag = image.rpartition(":")
    assert name.endswith("/raytag") and tag == importlib.metadata.version("raytag"), image
    used = [_load(AWS_YAML)["docker"]["image"]]
    used += [c["image"] for cs in _ray_containers(_load(RAYJOB_YAML)).values() for c in cs]
    assert used == [image] * 4, used


def test_makefile_keeps_deepspeed_on_the_cpu_only_where_there_is_no_gpu(tmp_path):
    """DS_ACCELERATOR=cpu is exported only where `nvidia-smi -L` fails: on a GPU machine `make demo`
    leaves DeepSpeed to find CUDA."""
    import os
    import shutil
    import subprocess

    make = shutil.which("make")
    if make is None:
        pytest.skip("make is absent")
    fake = tmp_path / "gpu-bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    (fake / "nvidia-smi").chmod(0o755)
    show = ["--eval", 'show-accelerator: ; @echo "[$$DS_ACCELERATOR]"', "-s", "show-accelerator"]
    base = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    no_gpu = {**base, "PATH": "/usr/bin:/bin"}
    gpu = {**base, "PATH": f"{fake}:/usr/bin:/bin"}
    out = {
        name: subprocess.run(
            [make, *show], cwd=REPO, env=env, capture_output=True, text=True, check=True
        ).stdout
        for name, env in (("cpu", no_gpu), ("gpu", gpu))
    }
    assert out == {"cpu": "[cpu]\n", "gpu": "[]\n"}
