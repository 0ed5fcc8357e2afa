"""The KubeRay manifests in cluster/kuberay/ against the CRDs in ../shared/kuberay-crds/ (fast)."""

from pathlib import Path

import pytest
import yaml

from jobs import kuberay
from jobs.kuberay import validate_manifest

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]

pytestmark = pytest.mark.skipif(
    not kuberay.CRD_DIR.is_dir(), reason=f"KubeRay CRDs not at {kuberay.CRD_DIR}"
)


def load(name):
    return yaml.safe_load((KUBERAY / name).read_text())


def write(tmp_path, doc, name="broken.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def one_error(path, key_path):
    errors = validate_manifest(path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: {key_path}: "), errors
    assert "fix:" in errors[0], errors
    return errors[0]


def cluster_spec(doc):
    return {
        "RayCluster": doc["spec"],
        "RayJob": doc["spec"].get("rayClusterSpec"),
        "RayService": doc["spec"].get("rayClusterConfig"),
    }[doc["kind"]]


def cluster_prefix(doc):
    return {
        "RayCluster": "spec",
        "RayJob": "spec.rayClusterSpec",
        "RayService": "spec.rayClusterConfig",
    }[doc["kind"]]


@pytest.mark.parametrize("name", MANIFESTS)
def test_shipped_manifests_are_clean(name):
    assert validate_manifest(KUBERAY / name) == []


@pytest.mark.parametrize("name", MANIFESTS)
def test_shipped_clusters_have_spot_and_on_demand_labels_and_autoscaler_v2(name):
    spec = cluster_spec(load(name))
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    markets = {g["labels"]["ray.io/market-type"] for g in spec["workerGroupSpecs"]}
    assert markets == ({"on-demand"} if name == "rayservice.yaml" else {"spot", "on-demand"})
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert "labels" not in group["rayStartParams"]
        image = group["template"]["spec"]["containers"][0]["image"]
        assert image.startswith("rayproject/ray:2.60.0")


def test_spot_group_targets_gke_and_eks_spot():
    spot = next(
        g
        for g in load("raycluster.yaml")["spec"]["workerGroupSpecs"]
        if g["labels"]["ray.io/market-type"] == "spot"
    )
    pod = spot["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
    assert keys == {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType"}
    assert {t["key"] for t in pod["tolerations"]} == keys


def test_rayjob_runs_the_pipeline_and_cleans_up():
    spec = load("rayjob.yaml")["spec"]
    assert spec["entrypoint"] == "python -m jobs.pipeline --config configs/fraud.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"].startswith("s3://")


def test_rayservice_serve_config_matches_configs_serve_yaml():
    shipped = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    embedded = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    # the one deliberate difference: on Kubernetes the proxies listen on all interfaces
    assert embedded["http_options"].pop("host") == "0.0.0.0"
    shipped["http_options"].pop("host")
    assert embedded == shipped


@pytest.mark.parametrize("name", MANIFESTS)
def test_typo_at_top_of_spec(tmp_path, name):
    doc = load(name)
    doc["spec"]["enableInTreeAutoscalling"] = True
    prefix = "spec" if name == "raycluster.yaml" else cluster_prefix(doc)
    if name != "raycluster.yaml":
        cluster_spec(doc)["enableInTreeAutoscalling"] = True
        del doc["spec"]["enableInTreeAutoscalling"]
    error = one_error(write(tmp_path, doc), f"{prefix}.enableInTreeAutoscalling")
    assert "did you mean `enableInTreeAutoscaling`" in error


@pytest.mark.parametrize("name", MANIFESTS)
def test_typo_in_worker_group_and_deep_in_pod_template(tmp_path, name):
    doc = load(name)
    group = cluster_spec(doc)["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")
    prefix = cluster_prefix(doc)
    error = one_error(write(tmp_path, doc), f"{prefix}.workerGroupSpecs[0].minReplica")
    assert "did you mean `minReplicas`" in error

    doc = load(name)
    container = cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resoures"] = container.pop("resources")
    error = one_error(
        write(tmp_path, doc),
        f"{prefix}.workerGroupSpecs[0].template.spec.containers[0].resoures",
    )
    assert "did you mean `resources`" in error


def test_typo_at_top_level(tmp_path):
    doc = load("raycluster.yaml")
    doc["spce"] = doc.pop("spec")
    error = one_error(write(tmp_path, doc), "spce")
    assert "did you mean `spec`" in error


@pytest.mark.parametrize("name", MANIFESTS)
def test_min_greater_than_max(tmp_path, name):
    doc = load(name)
    group = cluster_spec(doc)["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = 5, 3
    group["replicas"] = 4
    error = one_error(
        write(tmp_path, doc), f"{cluster_prefix(doc)}.workerGroupSpecs[0].minReplicas"
    )
    assert "minReplicas 5 > maxReplicas 3" in error


def test_replicas_outside_min_max(tmp_path):
    doc = load("raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][1]["replicas"] = 9
    error = one_error(write(tmp_path, doc), "spec.workerGroupSpecs[1].replicas")
    assert "outside [minReplicas 1, maxReplicas 4]" in error


@pytest.mark.parametrize("group", ["headGroupSpec", "workerGroupSpecs[0]"])
def test_labels_in_ray_start_params(tmp_path, group):
    doc = load("raycluster.yaml")
    spec = doc["spec"]
    target = spec["headGroupSpec"] if group == "headGroupSpec" else spec["workerGroupSpecs"][0]
    target["rayStartParams"]["labels"] = "ray.io/market-type=spot"
    error = one_error(write(tmp_path, doc), f"spec.{group}.rayStartParams.labels")
    assert "`labels` field" in error


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("maxReplicas", "10", "the CRD wants integer"), ("rayStartParams", {"num-cpus": 4}, "string")],
)
def test_wrong_type(tmp_path, key, value, expected):
    doc = load("raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0][key] = value
    path = f"spec.workerGroupSpecs[0].{key}" + (".num-cpus" if key == "rayStartParams" else "")
    assert expected in one_error(write(tmp_path, doc), path)


def test_wrong_enum(tmp_path):
    doc = load("raycluster.yaml")
    doc["spec"]["autoscalerOptions"]["version"] = "v3"
    assert "use one of v1, v2" in one_error(write(tmp_path, doc), "spec.autoscalerOptions.version")


def test_missing_required_field(tmp_path):
    doc = load("raycluster.yaml")
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    assert "add `groupName`" in one_error(
        write(tmp_path, doc), "spec.workerGroupSpecs[0].groupName"
    )


def test_resources_set_twice(tmp_path):
    doc = load("raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "8"
    error = one_error(write(tmp_path, doc), "spec.workerGroupSpecs[0].rayStartParams.num-cpus")
    assert "resources set twice" in error and "'4'" in error

    doc = load("raycluster.yaml")
    group = doc["spec"]["workerGroupSpecs"][0]
    group["rayStartParams"]["num-cpus"] = "4"  # equal to the limit: allowed alone
    assert validate_manifest(write(tmp_path, doc)) == []
    group["resources"] = {"CPU": "4"}
    error = one_error(write(tmp_path, doc), "spec.workerGroupSpecs[0].rayStartParams.num-cpus")
    assert "keep only the group's `resources`" in error


def test_duplicate_group_names(tmp_path):
    doc = load("raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][1]["groupName"] = "cpu-spot"
    one_error(write(tmp_path, doc), "spec.workerGroupSpecs[1].groupName")


@pytest.mark.parametrize(
    ("import_path", "problem"),
    [
        ("serving.app:app_buildr", "defines no `app_buildr`"),
        ("serving.nope:app_builder", "not in this repository"),
    ],
)
def test_rayservice_wrong_import_path(tmp_path, import_path, problem):
    doc = load("rayservice.yaml")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(
        "serving.app:app_builder", import_path
    )
    error = one_error(write(tmp_path, doc), "spec.serveConfigV2.applications[0].import_path")
    assert problem in error


def test_rayservice_serve_config_not_yaml_and_missing_config(tmp_path):
    doc = load("rayservice.yaml")
    doc["spec"]["serveConfigV2"] = "applications: [unclosed"
    assert "does not parse as YAML" in one_error(write(tmp_path, doc), "spec.serveConfigV2")

    doc = load("rayservice.yaml")
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(
        "configs/fraud.yaml", "configs/nope.yaml"
    )
    one_error(write(tmp_path, doc), "spec.serveConfigV2.applications[0].args.config")


def test_rayjob_missing_config_file(tmp_path):
    doc = load("rayjob.yaml")
    doc["spec"]["entrypoint"] = "python -m jobs.pipeline --config configs/nope.yaml"
    one_error(write(tmp_path, doc), "spec.entrypoint")


def test_wrong_kind_and_api_version(tmp_path):
    doc = load("raycluster.yaml")
    doc["apiVersion"] = "ray.io/v1alpha1"
    assert "use ray.io/v1" in one_error(write(tmp_path, doc), "apiVersion")
    doc["kind"] = "RayClustr"
    assert "RayCluster" in one_error(write(tmp_path, doc), "kind")


def test_unparsable_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [")
    [error] = validate_manifest(path)
    assert error.startswith(f"{path}: not valid YAML")


def test_missing_crd_dir_is_one_clear_error(tmp_path):
    errors = validate_manifest(KUBERAY / "raycluster.yaml", crd_dir=tmp_path / "nowhere")
    assert len(errors) == 1 and "KubeRay CRD for RayCluster not found" in errors[0]
