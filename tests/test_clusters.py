"""The cluster definitions under ``clusters/``, checked with Ray's own code.

- Launcher YAMLs go through ``prepare_config`` + ``validate_config`` (the JSON schema and
  checks ``ray up`` applies), then through the v2 autoscaler's own scheduler, to show which node
  types a training job's demand actually launches: spot first, on-demand when spot is marked
  unavailable or capped, CPU nodes for CPU-only work.
- KubeRay manifests are checked against the fields KubeRay documents, then converted with the
  translation Ray's autoscaler runs inside a KubeRay head (``_derive_autoscaling_config_from_ray_cr``)
  and validated and scheduled the same way.
- tests/test_kuberay.py checks the manifests against the KubeRay CRDs and runs the RayJob
  entrypoint the way KubeRay's submitter pod does; tests/test_launcher_sync.py rehearses what
  ``ray up`` syncs and installs on a node.
No cloud is contacted; nothing here needs credentials.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTERS = REPO / "clusters"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]
KUBERAY_DIR = CLUSTERS / "kuberay"
# The project image (clusters/docker/Dockerfile), as `docker build -t` names it; README says how it
# is pushed and pointed at the pushed copy.
PROJECT_IMAGE = "hrt-ray:0.1.0"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def prepared(name: str) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(load_yaml(CLUSTERS / name))


def worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def is_spot(provider: str, node_config: dict[str, Any]) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


def schedule(cfg: dict[str, Any], bundle: dict[str, float], count: int, unavailable: tuple[str, ...] = ()):
    """Node types (and counts) Ray's v2 autoscaler launches for ``count`` x ``bundle``.

    ``unavailable`` types get recoverable availability 0.0, as the autoscaler's
    CloudResourceMonitor scores a type right after an allocation of it timed out.
    """
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    # skip_content_hash: the file mounts (local token dir) need not exist on this machine.
    auto = AutoscalingConfig(copy.deepcopy(cfg), skip_content_hash=True)
    request = SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=auto.get_node_type_configs(),
        max_num_nodes=auto.get_max_num_nodes(),
        resource_requests=[
            ResourceRequestByCount(request=ResourceRequestUtil.make(bundle), count=count)
        ],
        recoverable_resource_availabilities={t: 0.0 for t in unavailable},
    )
    reply = ResourceDemandScheduler().schedule(request)
    assert not reply.infeasible_resource_requests, reply.infeasible_resource_requests
    return dict(sorted((launch.instance_type, launch.count) for launch in reply.to_launch))


# --------------------------------------------------------------------------------------------
# Cluster-launcher YAMLs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_rays_validation(name: str) -> None:
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared(name))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_rays_validation_rejects_broken_copies(name: str) -> None:
    """The validator is not a rubber stamp: typos and wrong types in our files would fail."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_yaml(CLUSTERS / name)
    typo = copy.deepcopy(raw)
    typo["idle_timeout_minute"] = typo.pop("idle_timeout_minutes")
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["gpu8_spot"]["resources"]["GPU"] = 0.5
    wrong_head = copy.deepcopy(raw)
    wrong_head["head_node_type"] = "no_such_type"
    for broken in (typo, fractional):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(broken))
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(wrong_head))


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_scales_from_zero_with_a_cpu_only_head(name: str) -> None:
    cfg = prepared(name)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no training or data tasks on the head"
    workers = worker_types(cfg)
    assert all(t["min_workers"] == 0 for t in workers.values()), "must scale down to zero"
    assert all(t["max_workers"] > 0 for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    gpus = sorted({t["resources"].get("GPU", 0) for t in workers.values()})
    assert gpus == [0, 1, 8], "CPU-only, single-GPU and 8-GPU worker types"


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_every_gpu_size_has_spot_and_an_identical_on_demand_fallback(name: str) -> None:
    cfg = prepared(name)
    provider = cfg["provider"]["type"]
    gpu_types = {k: v for k, v in worker_types(cfg).items() if v["resources"].get("GPU")}
    for gpus in (1, 8):
        sized = {k: v for k, v in gpu_types.items() if v["resources"]["GPU"] == gpus}
        spot = [v for v in sized.values() if is_spot(provider, v["node_config"])]
        ondemand = [v for v in sized.values() if not is_spot(provider, v["node_config"])]
        assert len(spot) == 1 and len(ondemand) == 1, (gpus, sorted(sized))
        # Equal resources make the scheduler's fit score tie, so priority decides.
        assert spot[0]["resources"] == ondemand[0]["resources"]
        assert spot[0]["priority"] > ondemand[0].get("priority", 0)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_rays_scheduler_launches_spot_first_then_falls_back(name: str) -> None:
    cfg = prepared(name)
    eight_workers = ({"GPU": 1, "CPU": 8}, 8)  # the published runs: 8 workers x 1 GPU
    assert schedule(cfg, *eight_workers) == {"gpu8_spot": 1}
    assert schedule(cfg, *eight_workers, unavailable=("gpu8_spot",)) == {"gpu8_ondemand": 1}
    # Beyond the spot cap (2 nodes) the rest comes on demand.
    assert schedule(cfg, {"GPU": 1, "CPU": 8}, 24) == {"gpu8_ondemand": 1, "gpu8_spot": 2}
    assert schedule(cfg, {"GPU": 1, "CPU": 4}, 1) == {"gpu1_spot": 1}
    # CPU-only work (Ray Data) lands on CPU nodes, never on a GPU node.
    assert schedule(cfg, {"CPU": 1}, 20) == {"cpu": 2}


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_runs_the_project_image_and_installs_nothing_at_boot(name: str) -> None:
    cfg = prepared(name)
    # One image everywhere: the project image has the runtime lock and the project.
    assert cfg["docker"]["image"] == PROJECT_IMAGE
    assert "head_image" not in cfg["docker"] and "worker_image" not in cfg["docker"]
    for node_type, spec in cfg["available_node_types"].items():
        assert "docker" not in spec, f"{node_type} overrides the project image"
    # Setup only points the installed project at the synced code: no dependency resolution.
    # (prepare_config merges setup_commands into the head's and the workers' lists, which are
    # what Ray runs.)
    install = ["python -m pip install --quiet --no-deps --no-build-isolation -e ~/hrt-ray"]
    assert cfg["worker_setup_commands"] == install
    # The head adds only the cloud client its autoscaler needs, exactly Ray's provider default.
    import ray.autoscaler

    provider_defaults = Path(ray.autoscaler.__file__).parent / cfg["provider"]["type"] / "defaults.yaml"
    assert cfg["head_setup_commands"] == install + load_yaml(provider_defaults)["head_setup_commands"]
    for node_type, spec in cfg["available_node_types"].items():
        assert spec.get("worker_setup_commands", install) == install, node_type
    commands = json.dumps([cfg.get(k) for k in ("setup_commands", "initialization_commands")])
    assert "requirements" not in commands
    assert cfg["file_mounts"]["~/hrt-ray"] == "."
    # rsync matches an unanchored name at any depth: hrt_ray/data is a package, not data.
    for pattern in cfg["rsync_exclude"]:
        if not any(ch in pattern for ch in "*?["):
            assert pattern.startswith("/"), f"{name}: rsync_exclude {pattern!r} matches at any depth"
    for heavy in ("/.git", "/.venv", "/runs", "/data"):
        assert heavy in cfg["rsync_exclude"]


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_dashboard_is_loopback_only_and_token_auth_is_on(name: str) -> None:
    cfg = prepared(name)
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    token_dir = "~/.hrt-ray-auth"
    assert cfg["file_mounts"][token_dir] == token_dir
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.hrt-ray-auth/auth_token" in start
    # No extra ingress: Ray's own rules (SSH + intra-cluster) are all there is.
    assert "IpPermissions" not in cfg["provider"].get("security_group", {})


def test_aws_nodes_use_least_privilege_roles_imdsv2_and_encrypted_disks() -> None:
    cfg = prepared("aws.yaml")
    for name, node_type in cfg["available_node_types"].items():
        node = node_type["node_config"]
        role = "hrt-ray-head" if name == cfg["head_node_type"] else "hrt-ray-worker"
        assert node["IamInstanceProfile"] == {"Name": role}, name
        assert node["MetadataOptions"]["HttpTokens"] == "required", name
        assert all(d["Ebs"]["Encrypted"] for d in node["BlockDeviceMappings"]), name
    assert cfg["provider"]["security_group"]["GroupName"] == "hrt-ray"
    assert cfg["provider"]["cache_stopped_nodes"] is False


def test_aws_iam_policies_are_scoped() -> None:
    head = json.loads((CLUSTERS / "aws" / "iam-head-policy.json").read_text())
    worker = json.loads((CLUSTERS / "aws" / "iam-worker-policy.json").read_text())
    json.loads((CLUSTERS / "aws" / "ec2-trust-policy.json").read_text())
    for policy in (head, worker):
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert all(a != "*" and not a.endswith(":*") for a in actions), statement
            if any(a.startswith("s3:") for a in actions):
                assert "${HRT_RAY_BUCKET}" in statement["Resource"], statement
    def actions(statement: dict[str, Any]) -> list[str]:
        return statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]

    assert not any(a.startswith("ec2:") for s in worker["Statement"] for a in actions(s))
    cluster_name = prepared("aws.yaml")["cluster_name"]
    # Ray's AWS node provider tags every instance it launches ray-cluster-name=<cluster_name>
    # (TagSpecifications in RunInstances) and later updates other ray-* tags with CreateTags.
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    owned = {f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster_name}
    terminate = next(s for s in head["Statement"] if "ec2:TerminateInstances" in actions(s))
    assert terminate["Condition"] == {"StringEquals": owned}
    assert set(actions(terminate)) <= {"ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"}
    tagging = [s for s in head["Statement"] if "ec2:CreateTags" in actions(s)]
    assert tagging, "Ray needs CreateTags"
    for statement in tagging:
        assert actions(statement) == ["ec2:CreateTags"], statement["Sid"]
        assert statement["Resource"] == "arn:aws:ec2:*:*:instance/*", statement["Sid"]
        condition = statement["Condition"]
        at_launch = condition == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
        ours_but_not_the_cluster_tag = condition == {
            "StringEquals": owned,
            "ForAllValues:StringNotEquals": {"aws:TagKeys": [TAG_RAY_CLUSTER_NAME]},
        }
        assert at_launch or ours_but_not_the_cluster_tag, statement["Sid"]
    launch = [s for s in head["Statement"] if "ec2:RunInstances" in actions(s)]
    instance_launch = [s for s in launch if "instance/*" in json.dumps(s["Resource"])]
    assert [s["Condition"] for s in instance_launch] == [
        {"StringEquals": {f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}": cluster_name}}
    ]
    assert all(s["Resource"] != "*" for s in launch)
    # Nothing else in the head policy may change ec2 instances.
    for statement in head["Statement"]:
        for action in actions(statement):
            if action.startswith("ec2:") and not action.startswith("ec2:Describe"):
                assert statement in [*tagging, *launch, terminate], (statement["Sid"], action)


def rays_gcp_configure_project() -> Any:
    """Ray's own ``_configure_project``, taken verbatim from the installed GCP provider.

    Importing ``ray.autoscaler._private.gcp.config`` needs the Google API client libraries, which
    only the machine running ``ray up`` for GCP installs; the function itself uses nothing but
    ``copy`` and the helpers it calls, so its source is compiled on its own.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("ray.autoscaler._private.gcp.config")
    assert spec is not None and spec.origin
    source = Path(spec.origin).read_text()
    node = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "_configure_project"
    )
    namespace: dict[str, Any] = {"copy": copy}

    def no_api_call(*args: Any) -> None:
        raise AssertionError("Ray reached the Cloud Resource Manager API")

    namespace["_get_project"] = namespace["_create_project"] = no_api_call
    exec(compile(ast.Module([node], []), spec.origin, "exec"), namespace)
    return namespace["_configure_project"]


def test_gcp_has_no_sample_project_and_ray_says_so() -> None:
    """A sample project id makes Ray's GCP provider try to create that project when it cannot
    read it; without one, Ray's own bootstrap step stops before any API call, naming the key."""
    _configure_project = rays_gcp_configure_project()
    cfg = prepared("gcp.yaml")
    assert cfg["provider"]["project_id"] is None
    with pytest.raises(AssertionError, match="'project_id' must be set in the 'provider' section"):
        _configure_project(cfg, crm=None)


def test_gcp_workers_only_get_storage_and_logging_scopes() -> None:
    cfg = prepared("gcp.yaml")
    for name, node_type in worker_types(cfg).items():
        accounts = node_type["node_config"]["serviceAccounts"]
        scopes = {s for a in accounts for s in a["scopes"]}
        assert scopes == {
            "https://www.googleapis.com/auth/devstorage.read_write",
            "https://www.googleapis.com/auth/logging.write",
        }, name
        if node_type["resources"].get("GPU"):
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name


# --------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------


def ray_cluster_specs() -> dict[str, dict[str, Any]]:
    cluster = load_yaml(KUBERAY_DIR / "raycluster.yaml")
    job = load_yaml(KUBERAY_DIR / "rayjob.yaml")
    return {"raycluster.yaml": cluster["spec"], "rayjob.yaml": job["spec"]["rayClusterSpec"]}


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_structure(name: str) -> None:
    doc = load_yaml(KUBERAY_DIR / name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[name]
    assert doc["metadata"]["name"]
    spec = ray_cluster_specs()[name]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "no LoadBalancer/NodePort: port-forward only"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in containers(head)[0]["resources"]["limits"]
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    gpu_counts = []
    for group in groups:
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        container = containers(group)[0]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits, "Guaranteed pods"
        gpu_counts.append(int(limits.get("nvidia.com/gpu", 0)))
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["runAsNonRoot"] is True
    assert 8 in gpu_counts and 0 in gpu_counts
    images = {c["image"] for g in [head, *groups] for c in containers(g)}
    assert images == {"hrt-ray:0.1.0"}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_spec_through_rays_own_translation_and_scheduler(name: str) -> None:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import prepare_config, validate_config

    cr = {"metadata": {"name": "hrt-ray", "namespace": "default"}, "spec": ray_cluster_specs()[name]}
    cfg = _derive_autoscaling_config_from_ray_cr(cr)
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["gpu8-spot"]["resources"] == types["gpu8-ondemand"]["resources"]
    assert types["gpu8-spot"]["resources"]["GPU"] == 8
    assert cfg["idle_timeout_minutes"] == 10
    eight_workers = ({"GPU": 1, "CPU": 8}, 8)
    assert schedule(cfg, *eight_workers) == {"gpu8-spot": 1}
    assert schedule(cfg, *eight_workers, unavailable=("gpu8-spot",)) == {"gpu8-ondemand": 1}
    assert schedule(cfg, {"CPU": 1}, 4) == {"cpu": 1}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_spot_fallback_timeout_is_set_for_the_autoscaler(name: str) -> None:
    env = {e["name"]: e["value"] for e in ray_cluster_specs()[name]["autoscalerOptions"]["env"]}
    # Ray reads this name (ray/autoscaler/v2/instance_manager/config.py).
    import inspect

    from ray.autoscaler.v2.instance_manager import config as im_config

    assert "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S" in inspect.getsource(im_config)
    assert 0 < int(env["RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S"]) <= 1800


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_spot_pods_drain_as_preemption_within_their_grace_period(name: str) -> None:
    """A reclaimed spot pod gets SIGTERM; Ray drains its node (reason PREEMPTION) for
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, which must end before Kubernetes kills the pod."""
    from ray._private import ray_constants

    assert ray_constants.RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S > 0  # the drain exists in 2.60
    spot = [g for g in ray_cluster_specs()[name]["workerGroupSpecs"] if "spot" in g["groupName"]]
    assert spot
    for group in spot:
        pod = group["template"]["spec"]
        env = {e["name"]: e["value"] for e in containers(group)[0]["env"]}
        drain_s = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert 0 < drain_s < pod["terminationGracePeriodSeconds"], group["groupName"]


def test_dockerfile_builds_on_the_same_ray_release() -> None:
    dockerfile = (CLUSTERS / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S*rayproject/ray:2\.60\.0-py311\S*", dockerfile, re.M)
    ignored = (CLUSTERS / "docker" / "Dockerfile.dockerignore").read_text().split()
    for path in (".git", ".venv", "data", "runs", ".hrt-ray-auth"):
        assert any(p.strip("/") == path for p in ignored), path


# --------------------------------------------------------------------------------------------
# Everything under clusters/
# --------------------------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    # A literal secret value (40 base64 characters), not a reference such as "$AWS_...".
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{30,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\"private_key\"\s*:"),  # GCP service-account JSON
    re.compile(r"(?i)(password|passwd)\s*[:=]\s*\S"),
    re.compile(r"(?i)RAY_AUTH_TOKEN\s*[:=]\s*[0-9a-f]{16,}"),
]


def test_no_credentials_in_cluster_files() -> None:
    files = [p for p in CLUSTERS.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{path.relative_to(REPO)} matches {pattern.pattern}"


def test_readme_references_existing_files() -> None:
    readme = (CLUSTERS / "README.md").read_text()
    referenced = set(re.findall(r"((?:clusters|jobs)/[\w./-]+\.(?:yaml|json|md))", readme))
    assert {"clusters/aws.yaml", "clusters/gcp.yaml", "clusters/kuberay/rayjob.yaml"} <= referenced
    missing = [p for p in referenced if not (REPO / p).is_file()]
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# GPU driver, auth order and the guide's edit commands
# --------------------------------------------------------------------------------------------

IMAGE_KEYS = re.compile(r"^\s*(ImageId|sourceImage):\s*(\S+)")
DRIVER_COMMENT = re.compile(r"^\s*#\s*nvidia-driver:\s*(\d+)(?:\.\d+)*\s*$")


def minimum_driver() -> int:
    """The one line of the guide that states it; the packaging tests check the same line against
    the CUDA runtime the pinned torch depends on."""
    (line,) = re.findall(r"^\s*Minimum NVIDIA driver: (\d+)\s*$", (CLUSTERS / "README.md").read_text(), re.M)
    return int(line)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_every_host_image_documents_a_driver_that_meets_the_minimum(name: str) -> None:
    lines = (CLUSTERS / name).read_text().splitlines()
    images = [(i, m.group(2)) for i, line in enumerate(lines) if (m := IMAGE_KEYS.match(line))]
    assert images, f"{name} names no host image"
    for index, image in images:
        drivers = []
        j = index - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            if m := DRIVER_COMMENT.match(lines[j]):
                drivers.append(int(m.group(1)))
            j -= 1
        assert drivers, f"{name}:{index + 1}: {image} has no '# nvidia-driver: N' comment above it"
        assert drivers[0] >= minimum_driver(), f"{name}:{index + 1}: {image} has driver {drivers[0]}"
        assert "latest" not in image.split("/"), f"{name}:{index + 1}: unpinned {image}"
    # The boot check on GPU nodes enforces the same number.
    cfg = prepared(name)
    for node_type, spec in worker_types(cfg).items():
        if spec["resources"].get("GPU"):
            check = " ".join(c for c in spec["initialization_commands"] if "nvidia-smi" in c)
            assert f"-ge {minimum_driver()} " in check, node_type


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def test_token_auth_is_exported_before_the_head_starts() -> None:
    """A head started before RAY_AUTH_MODE=token is exported runs without auth, and every later
    `ray job submit` with a token is refused."""
    blocks = [b for doc in ("README.md", "clusters/README.md") for b in bash_blocks((REPO / doc).read_text())]
    starts = [b for b in blocks if "ray start --head" in b]
    assert starts, "no `ray start --head` in the docs"
    for block in starts:
        before = block[: block.index("ray start --head")]
        assert re.search(r"export RAY_AUTH_MODE=token", before), block
    for name in LAUNCHER_YAMLS:
        for cmd in prepared(name)["head_start_ray_commands"]:
            if "ray start" in cmd:
                assert cmd.index("export RAY_AUTH_MODE=token") < cmd.index("ray start"), name


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_the_guides_edit_commands_give_a_config_ray_accepts(name: str, tmp_path: Path) -> None:
    """Run the guide's `sed -i ... clusters/<name>` lines, as written, on a copy."""
    from ray.autoscaler._private.util import validate_config

    edits = [
        line.strip()
        for block in bash_blocks((CLUSTERS / "README.md").read_text())
        for line in block.splitlines()
        if line.strip().startswith("sed -i") and line.strip().endswith(f"clusters/{name}")
    ]
    assert edits, f"the guide never says how to edit clusters/{name}"
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / name).write_text((CLUSTERS / name).read_text())
    env = {"PATH": "/usr/bin:/bin", "REGISTRY": "registry.example/hrt", "PROJECT": "my-project-123"}
    for edit in edits:
        subprocess.run(["/bin/bash", "-ce", edit], cwd=tmp_path, env=env, check=True, timeout=30)
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(load_yaml(tmp_path / "clusters" / name))
    validate_config(cfg)
    assert cfg["docker"]["image"] == f"registry.example/hrt/{PROJECT_IMAGE}"
    if cfg["provider"]["type"] == "gcp":
        assert cfg["provider"]["project_id"] == "my-project-123"
