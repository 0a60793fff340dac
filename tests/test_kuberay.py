"""The KubeRay manifests, read the way the KubeRay v1.7.0 operator and Kubernetes read them.

- Each manifest is validated against the ``openAPIV3Schema`` of the CRD the guide names, vendored
  under tests/fixtures/kuberay/ (see its README for origin and for how the Kubernetes extensions
  are translated for ``jsonschema``).
- The RayJob's entrypoint is run the way KubeRay's submitter pod runs it: the command line that
  ``BuildJobSubmitCommand`` (ray-operator/controllers/ray/common/job.go) assembles for K8sJobMode,
  executed by a real ``/bin/bash -ce --`` (``utils.GetContainerCommand``) with the environment the
  submitter container gets (its declared ``env``/``envFrom`` plus what ``configureSubmitterContainer``
  in rayjob_controller.go adds), *not* the head's. ``ray`` and ``python`` on that pod's PATH are
  recorders, so the shell's own expansion produces the argv that ``ray job submit`` would receive;
  the part after ``--`` is then parsed by hrt_ray's config loader.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY_DIR = REPO / "clusters" / "kuberay"
CRD_DIR = REPO / "tests" / "fixtures" / "kuberay"
KUBERAY_VERSION = "v1.7.0"
MANIFEST_CRDS = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml"}

# KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go
BASE_PYTHON_HEALTH_COMMAND = (
    "python -c \"import urllib.request; r=urllib.request.urlopen('%s', timeout=%d); "
    "exit(0 if b'success' in r.read() else 1)\""
)
DASHBOARD_GCS_HEALTH_PATH = "api/gcs_healthz"
DASHBOARD_GCS_HEALTH_TIMEOUT_S = 10

# GKE: pods on a preempted Spot VM get at most 15 s of graceful termination
# (cloud.google.com/kubernetes-engine/docs/concepts/spot-vms, "Termination and graceful shutdown").
GKE_SPOT_POD_GRACE_S = 15


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def structural_to_jsonschema(schema: Any) -> Any:
    """Translate a Kubernetes structural schema so ``jsonschema`` accepts what the API server does."""
    if isinstance(schema, list):
        return [structural_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: structural_to_jsonschema(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("anyOf", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def load_crd(crd_file: str) -> Any:
    # libyaml: the CRDs are 1-1.4 MB of YAML, which the pure-Python loader takes ~10x longer to read.
    return yaml.load((CRD_DIR / crd_file).read_text(), Loader=yaml.CSafeLoader)


@functools.cache
def crd_validator(crd_file: str) -> jsonschema.Draft7Validator:
    crd = load_crd(crd_file)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(manifest: dict[str, Any], crd_file: str) -> list[str]:
    errors = crd_validator(crd_file).iter_errors(manifest)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors)


@pytest.mark.parametrize("name", sorted(MANIFEST_CRDS))
def test_manifest_matches_the_kuberay_crd_schema(name: str) -> None:
    manifest = load_yaml(KUBERAY_DIR / name)
    crd = load_crd(MANIFEST_CRDS[name])
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/v1"
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    errors = crd_errors(manifest, MANIFEST_CRDS[name])
    assert not errors, f"clusters/kuberay/{name} vs KubeRay {KUBERAY_VERSION} CRD:\n" + "\n".join(errors)


@pytest.mark.parametrize("name", sorted(MANIFEST_CRDS))
def test_crd_validation_catches_typos_and_wrong_types(name: str) -> None:
    """The schema check is not a rubber stamp: what the API server would reject fails here too."""
    manifest = load_yaml(KUBERAY_DIR / name)
    spec = manifest["spec"] if name == "raycluster.yaml" else manifest["spec"]["rayClusterSpec"]
    typo = copy.deepcopy(manifest)
    typo_spec = typo["spec"] if name == "raycluster.yaml" else typo["spec"]["rayClusterSpec"]
    typo_spec["workerGroupSpecs"][0]["maxReplica"] = typo_spec["workerGroupSpecs"][0].pop("maxReplicas")
    wrong_type = copy.deepcopy(manifest)
    wrong_spec = wrong_type["spec"] if name == "raycluster.yaml" else wrong_type["spec"]["rayClusterSpec"]
    wrong_spec["enableInTreeAutoscaling"] = "yes"
    bad_quantity = copy.deepcopy(manifest)
    bad_spec = bad_quantity["spec"] if name == "raycluster.yaml" else bad_quantity["spec"]["rayClusterSpec"]
    bad_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [4]
    assert spec["workerGroupSpecs"]
    for broken in (typo, wrong_type, bad_quantity):
        assert crd_errors(broken, MANIFEST_CRDS[name])


def go_quote(text: str) -> str:
    """Go's ``strconv.Quote`` for the printable ASCII that the manifests use."""
    assert all(32 <= ord(c) < 127 for c in text), text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def health_command(address: str) -> str:
    url = f"{address}/{DASHBOARD_GCS_HEALTH_PATH}"
    return BASE_PYTHON_HEALTH_COMMAND % (url, DASHBOARD_GCS_HEALTH_TIMEOUT_S)


def build_job_submit_command(rayjob: dict[str, Any], dashboard_url: str, job_id: str) -> list[str]:
    """``BuildJobSubmitCommand(rayJob, K8sJobMode)`` of KubeRay v1.7.0, transcribed step for step
    (ray-operator/controllers/ray/common/job.go) for the fields a RayJob may set."""
    spec = rayjob["spec"]
    address = dashboard_url if dashboard_url.startswith("http://") else "http://" + dashboard_url
    cmd = ["until", health_command(address), ">/dev/null", "2>&1", ";"]
    cmd += ["do", "echo", go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ...")]
    cmd += [";", "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";"]
    cmd += ["then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        # yaml.YAMLToJSON: compact JSON
        runtime_env = json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), separators=(",", ":"))
        cmd += ["--runtime-env-json", go_quote(runtime_env)]
    if spec.get("metadata"):
        cmd += ["--metadata-json", go_quote(json.dumps(spec["metadata"], separators=(",", ":")))]
    if job_id:
        cmd += ["--submission-id", job_id]
    if spec.get("entrypointNumCpus", 0) > 0:
        cmd += ["--entrypoint-num-cpus", f"{float(spec['entrypointNumCpus']):f}"]
    if spec.get("entrypointNumGpus", 0) > 0:
        cmd += ["--entrypoint-num-gpus", f"{float(spec['entrypointNumGpus']):f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", go_quote(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip(), ";", "fi", ";"]
    cmd += ["ray", "job", "logs", "--address", address, "--follow", job_id]
    return cmd


def test_transcription_reproduces_kuberays_own_expected_command() -> None:
    """KubeRay's unit test TestBuildJobSubmitCommandWithK8sJobModeAndYAML (job_test.go, v1.7.0),
    its input and expected output, against the transcription above."""
    rayjob = {
        "spec": {
            "runtimeEnvYAML": (
                '\nworking_dir: "https://example.invalid/a.zip"\npip: ["python-multipart==0.0.6"]\n'
            ),
            "metadata": {"testKey": "testValue"},
            "entrypoint": "echo no quote 'single quote' \"double quote\"",
        }
    }
    address = "http://127.0.0.1:8265"
    expected = [
        "until",
        health_command(address),
        ">/dev/null", "2>&1", ";",
        "do", "echo", '"Waiting for Ray Dashboard GCS to become healthy at http://127.0.0.1:8265 ..."', ";",
        "sleep", "2", ";", "done", ";",
        "if", "!", "ray", "job", "status", "--address", address, "testJobId", ">/dev/null", "2>&1", ";",
        "then",
        "ray", "job", "submit", "--address", address, "--no-wait",
        "--runtime-env-json",
        '"{\\"working_dir\\":\\"https://example.invalid/a.zip\\",\\"pip\\":[\\"python-multipart==0.0.6\\"]}"',
        "--metadata-json", '"{\\"testKey\\":\\"testValue\\"}"',
        "--submission-id", "testJobId",
        "--", "echo no quote 'single quote' \"double quote\"", ";", "fi", ";",
        "ray", "job", "logs", "--address", address, "--follow", "testJobId",
    ]  # fmt: skip
    assert build_job_submit_command(rayjob, address, "testJobId") == expected


RECORDER = """#!/bin/sh
# Stand-in for `{name}` on the submitter pod: records its argv, answers like a fresh cluster.
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "{name}" "$@" >> "{log}"
case "{name} $1 $2" in
  "ray job status") exit 1 ;;  # not submitted yet
esac
exit 0
"""


def submitter_environment(rayjob: dict[str, Any], configmaps: dict[str, dict[str, str]]) -> dict[str, str]:
    """The submitter container's environment as Kubernetes builds it: ``envFrom`` sources first,
    then ``env`` (which wins), then what KubeRay appends in configureSubmitterContainer."""
    template = rayjob["spec"].get("submitterPodTemplate")
    container = template["spec"]["containers"][0] if template else {}  # KubeRay's default: no env
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = source["configMapRef"]
            if ref["name"] in configmaps:
                env.update(configmaps[ref["name"]])
            else:
                assert ref.get("optional"), f"ConfigMap {ref['name']} missing: the pod would not start"
    for var in container.get("env", []):
        env[var["name"]] = var["value"]
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_DASHBOARD_ADDRESS"] = "hrt-ray-head-svc.default.svc.cluster.local:8265"
    env["RAY_JOB_SUBMISSION_ID"] = "hrt-ray-cityscapes-hrt-s-w7-abcde"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = "t" * 32
    return env


def test_rayjob_entrypoint_as_kuberays_submitter_runs_it(tmp_path: Path) -> None:
    from hrt_ray.config import load_config

    rayjob = load_yaml(KUBERAY_DIR / "rayjob.yaml")
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    # The ConfigMap as the guide creates it (clusters/README.md, KubeRay step 2).
    configmaps = {"hrt-ray-run": {"HRT_RAY_STORAGE": "s3://bucket/runs", "HRT_RAY_DATA": "s3://bucket/data"}}
    env = submitter_environment(rayjob, configmaps)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.jsonl"
    for tool in ("ray", "python"):
        script = bin_dir / tool
        script.write_text(RECORDER.format(name=tool, log=log))
        script.chmod(0o755)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    env["HOME"] = str(tmp_path)
    job_id = env["RAY_JOB_SUBMISSION_ID"]
    command = build_job_submit_command(rayjob, env["RAY_DASHBOARD_ADDRESS"], job_id)
    # utils.GetContainerCommand(["e"]) + Args: [strings.Join(jobCmd, " ")]
    argv = ["/bin/bash", "-ce", "--", " ".join(command)]
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    submits = [c for c in calls if c[:3] == ["ray", "job", "submit"]]
    assert len(submits) == 1, calls
    submit = submits[0]
    assert submit[submit.index("--submission-id") + 1] == job_id
    entrypoint = submit[submit.index("--") + 1 :]
    assert entrypoint[:3] == ["hrt-ray", "train", "--config"], entrypoint
    assert calls[-1][:3] == ["ray", "job", "logs"]

    # The submitter runs `ray` from the project image, like every Ray pod of the job.
    submitter = spec["submitterPodTemplate"]["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert submitter["containers"][0]["image"] == head["image"]
    assert submitter["restartPolicy"] == "Never", "a Kubernetes Job's pod must not restart itself"

    cfg = load_config(REPO / entrypoint[3], entrypoint[4:])
    assert cfg.storage.path == "s3://bucket/runs"
    assert cfg.data.train_uri == "s3://bucket/data/cityscapes/train"
    assert cfg.data.val_uri == "s3://bucket/data/cityscapes/val"
    assert cfg.model.pretrained == "s3://bucket/data/pretrained/hrt_small.pth"
    # The job fits the largest GPU group the RayJob's cluster can create.
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpu_capacity = max(
        int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        * g["maxReplicas"]
        for g in groups
    )
    assert cfg.scaling.num_workers * cfg.scaling.gpus_per_worker <= gpu_capacity
    assert shlex.join(entrypoint)  # a plain argv, nothing left unexpanded
    assert not any("$" in a for a in entrypoint), entrypoint


def test_rayjob_tears_its_cluster_down_at_once() -> None:
    spec = load_yaml(KUBERAY_DIR / "rayjob.yaml")["spec"]
    # ttlSecondsAfterFinished delays the RayCluster's deletion and only acts with
    # shutdownAfterJobFinishes (KubeRay v1.7.0 rayjob_types.go).
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 0, "GPU pods would idle that long after the job"


@pytest.mark.parametrize("name", sorted(MANIFEST_CRDS))
def test_spot_drain_ends_within_gkes_spot_notice(name: str) -> None:
    doc = load_yaml(KUBERAY_DIR / name)
    spec = doc["spec"] if name == "raycluster.yaml" else doc["spec"]["rayClusterSpec"]
    spot = [g for g in spec["workerGroupSpecs"] if "spot" in g["groupName"]]
    assert spot
    for group in spot:
        container = group["template"]["spec"]["containers"][0]
        drain = {e["name"]: e["value"] for e in container["env"]}["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]
        assert 0 < float(drain) < GKE_SPOT_POD_GRACE_S, group["groupName"]


def test_guide_names_the_vendored_kuberay_release() -> None:
    guide = (REPO / "clusters" / "README.md").read_text()
    assert f"KubeRay {KUBERAY_VERSION}" in guide
    assert KUBERAY_VERSION in (CRD_DIR / "README.md").read_text()
    for name in MANIFEST_CRDS:
        assert f"KubeRay {KUBERAY_VERSION}" in (KUBERAY_DIR / name).read_text()
    assert os.path.getsize(CRD_DIR / "ray.io_rayjobs.yaml") > 100_000  # the real CRD, not a stub
