"""The Kubernetes examples (examples/kubernetes/) and the Dockerfile, checked offline.

No cluster and no container engine run here, so:

- every manifest is validated against the Kubernetes OpenAPI schemas that the
  kubernetes-validate package ships, in strict mode (an unknown or misspelt
  field fails), for the oldest version the examples support (1.29: native
  sidecar containers) and for the newest one the package knows;
- the schemas check structure, not values or references, so the checks the
  API server and the kubelet would make on values (a selector that matches
  its template, a probe's named port, a mounted volume that exists...) are
  made here;
- then what the examples are for: the pod's only nameserver is resolverd on
  127.0.0.1, probes on /healthz and /readyz of the metrics listener, RBAC of
  exactly get/list/watch on services and endpointslices, and configs that
  resolverd itself accepts;
- the Dockerfile is linted: what it copies, who it runs as, what it exposes,
  and that its entrypoint is resolverd's console script.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from resolverd import cli
from resolverd.config import Config, load_config, parse_hostport

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Native sidecars (initContainers[].restartPolicy: Always) are on by default
# from 1.29; the newest version is whatever kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

CONFIG_KEY = "resolverd.yaml"
CONFIG_DIR = "/etc/resolverd"
STATE_DIR = "/var/lib/resolverd"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
METRICS_PORT = 9153

Manifest = dict[str, Any]


# --------------------------------------------------------------------------- loading


def _documents() -> list[tuple[str, Manifest]]:
    docs: list[tuple[str, Manifest]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                docs.append((f"{path.name}#{index}", doc))
    return docs


DOCS = _documents()


def _id(doc: Manifest) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _all(kind: str) -> list[Manifest]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _one(kind: str, name: str) -> Manifest:
    found = [doc for doc in _all(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads() -> list[Manifest]:
    return [doc for _, doc in DOCS if doc["kind"] in ("Deployment", "DaemonSet")]


def _pod(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def _containers(pod: Manifest) -> list[Manifest]:
    """Every container of a pod spec: init (sidecars included) and regular."""
    return [*pod.get("initContainers", []), *pod["containers"]]


def _container(pod: Manifest, name: str) -> Manifest:
    found = [c for c in _containers(pod) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def _mount(container: Manifest, path: str) -> Manifest:
    found = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(found) == 1, f"{container['name']}: nothing mounted at {path}"
    return found[0]


def _volume(pod: Manifest, name: str) -> Manifest:
    found = [v for v in pod.get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"no volume {name!r}"
    return found[0]


def _config_map_of(workload: Manifest, container: Manifest) -> Manifest:
    """The ConfigMap mounted at /etc/resolverd in the container."""
    volume = _volume(_pod(workload), _mount(container, CONFIG_DIR)["name"])
    return _one("ConfigMap", volume["configMap"]["name"])


def _raw_config(config_map: Manifest) -> Manifest:
    raw: Manifest = yaml.safe_load(config_map["data"][CONFIG_KEY])
    return raw


def _resolverd_workloads() -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, container) for each container that runs resolverd."""
    for workload in _workloads():
        for container in _containers(_pod(workload)):
            if container["image"].split("/")[-1].startswith("resolverd:"):
                yield workload, container


def _ids(pairs: list[tuple[Manifest, Manifest]]) -> list[str]:
    return [f"{_id(w)}:{c['name']}" for w, c in pairs]


RESOLVERD = list(_resolverd_workloads())


def _memory(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "": 1}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|k|M|G|)", quantity)
    assert match, f"unexpected quantity {quantity!r}"
    return float(match[1]) * units[match[2]]


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# --------------------------------------------------------------------------- schemas


def test_the_examples_are_all_there() -> None:
    files = {path.name for path in EXAMPLES.iterdir()}
    assert {
        "rbac.yaml",
        "configmap.yaml",
        "sidecar-deployment.yaml",
        "daemonset.yaml",
        "README.md",
    } <= files
    assert len(RESOLVERD) == 2  # the sidecar and the DaemonSet


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[f"{w}-{_id(d)}" for w, d in DOCS])
def test_manifest_matches_the_kubernetes_schema(where: str, doc: Manifest, version: str) -> None:
    problem = None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        problem = f"{where} {_id(doc)} (Kubernetes {exc.version}): {path}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        problem = f"{where}: {exc.message}"
    if problem:
        pytest.fail(problem, pytrace=False)


def test_the_schema_check_is_strict() -> None:
    """A misspelt field fails, so the test above really checks something."""
    deployment = _one("Deployment", "web")
    kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["dnsConfg"] = typo["spec"]["template"]["spec"]["dnsConfig"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)


def test_the_schema_check_knows_the_version() -> None:
    """Before 1.28 a container had no restartPolicy: the sidecar fails there."""
    if "1.27.0" not in kubernetes_validate.utils.all_versions():
        pytest.skip("this kubernetes-validate no longer ships the 1.27 schemas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(_one("Deployment", "web"), "1.27.0", strict=True)


# --------------------------------------------------------------------------- API server's checks

_NAMESPACED = {"ClusterRole": False, "ClusterRoleBinding": False}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# The kubelet's safe sysctls: allowed without --allowed-unsafe-sysctls and by
# the baseline and restricted Pod Security Standards.
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
}


@pytest.mark.parametrize(("where", "doc"), DOCS, ids=[f"{w}-{_id(d)}" for w, d in DOCS])
def test_metadata(where: str, doc: Manifest) -> None:
    name = doc["metadata"]["name"]
    assert _DNS_LABEL.fullmatch(name) and len(name) <= 63, f"{where}: bad name {name!r}"
    if _NAMESPACED.get(doc["kind"], True):
        assert doc["metadata"].get("namespace") == "default", f"{where}: namespace"
    else:
        assert "namespace" not in doc["metadata"], f"{where}: cluster-scoped"


def test_names_are_unique_per_kind() -> None:
    seen = [(doc["kind"], doc["metadata"].get("namespace"), _id(doc)) for _, doc in DOCS]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("workload", _workloads(), ids=_id)
def test_workload_references(workload: Manifest) -> None:
    """What `kubectl apply` would be told by the server, or the kubelet by the pod."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "selector does not match the template"

    pod = _pod(workload)
    containers = _containers(pod)
    names = [c["name"] for c in containers]
    assert len(names) == len(set(names)), "container names must be unique"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert len(volumes) == len(pod.get("volumes", [])), "volume names must be unique"

    port_names = [p["name"] for c in containers for p in c.get("ports", []) if "name" in p]
    assert len(port_names) == len(set(port_names)), "port names must be unique in a pod"
    for port_name in port_names:
        assert _PORT_NAME.fullmatch(port_name) and len(port_name) <= 15, port_name

    for container in containers:
        own_ports = {p["name"]: p for p in container.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = container.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str):
                assert port in own_ports, f"{container['name']}.{probe}: no port {port!r}"
                assert own_ports[port]["protocol"] == "TCP"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']!r}"
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        assert requests, f"{container['name']}: no resource requests"
        if "memory" in limits:
            assert _memory(requests["memory"]) <= _memory(limits["memory"])
        if "cpu" in limits:
            assert _cpu(requests["cpu"]) <= _cpu(limits["cpu"])
    for container in pod.get("initContainers", []):
        assert container.get("restartPolicy", "Always") == "Always"  # the only allowed value

    for volume in volumes.values():
        config_maps = [volume.get("configMap")] + [
            source.get("configMap") for source in volume.get("projected", {}).get("sources", [])
        ]
        for ref in filter(None, config_maps):
            if ref["name"] == "kube-root-ca.crt":  # published in every namespace
                continue
            data = _one("ConfigMap", ref["name"])["data"]
            for item in ref.get("items", []):
                assert item["key"] in data, f"ConfigMap {ref['name']} has no key {item['key']}"

    account = pod.get("serviceAccountName")
    if account is not None:
        _one("ServiceAccount", account)
    assert pod.get("dnsPolicy", "ClusterFirst") in {
        "ClusterFirst",
        "ClusterFirstWithHostNet",
        "Default",
        "None",
    }
    if pod.get("dnsPolicy") == "None":
        assert 1 <= len(pod["dnsConfig"]["nameservers"]) <= 3
    for sysctl in pod.get("securityContext", {}).get("sysctls", []):
        assert sysctl["name"] in _SAFE_SYSCTLS, f"unsafe sysctl {sysctl['name']}"
        assert not pod.get("hostNetwork"), "net sysctls are not allowed with hostNetwork"


@pytest.mark.parametrize("service", _all("Service"), ids=_id)
def test_service_selects_a_pod_and_its_ports(service: Manifest) -> None:
    selector = service["spec"]["selector"]
    pods = [
        _pod(w)
        for w in _workloads()
        if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(pods) == 1, f"{_id(service)} selects {len(pods)} workloads"
    ports = {p["name"]: p for c in _containers(pods[0]) for p in c.get("ports", [])}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert isinstance(target, str), "name the target port"
        assert target in ports, f"{_id(service)}: no container port {target!r}"
        assert ports[target]["protocol"] == port["protocol"]


# --------------------------------------------------------------------------- RBAC


def test_rbac_is_read_only_on_services_and_endpointslices() -> None:
    (role,) = _all("ClusterRole")
    assert not _all("Role"), "one set of rules: the ClusterRole"
    granted: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, no URLs"
        granted |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    assert granted == {
        (group, resource, verb)
        for group, resource in (("", "services"), ("discovery.k8s.io", "endpointslices"))
        for verb in ("get", "list", "watch")
    }


def test_rbac_is_granted_to_the_pods_in_the_namespaces_resolverd_reads() -> None:
    (account,) = _all("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    (role,) = _all("ClusterRole")
    assert not _all("ClusterRoleBinding"), "read access per namespace, not cluster-wide"
    bound: set[str] = set()
    for binding in _all("RoleBinding"):
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": account["metadata"]["name"],
                "namespace": account["metadata"]["namespace"],
            }
        ]
        bound.add(binding["metadata"]["namespace"])
    for workload, container in RESOLVERD:
        assert _pod(workload)["serviceAccountName"] == account["metadata"]["name"]
        provider = _raw_config(_config_map_of(workload, container))["service_discovery"]
        assert set(provider["namespaces"]) <= bound, f"{_id(workload)}: namespaces not bound"


# --------------------------------------------------------------------------- resolverd's containers


@pytest.mark.parametrize(("workload", "container"), RESOLVERD, ids=_ids(RESOLVERD))
def test_probes_on_the_metrics_listener(workload: Manifest, container: Manifest) -> None:
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["metrics"] == {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": ("/healthz", "metrics"),
        "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
    }
    # The kubelet probes the pod IP: the listener must not be loopback only.
    raw = _raw_config(_config_map_of(workload, container))
    host, port = parse_hostport(raw["metrics"]["listen"], default_port=METRICS_PORT)
    assert (host, port) == ("0.0.0.0", METRICS_PORT)


@pytest.mark.parametrize(("workload", "container"), RESOLVERD, ids=_ids(RESOLVERD))
def test_resolverd_runs_locked_down(workload: Manifest, container: Manifest) -> None:
    pod = _pod(workload)
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == _dockerfile_user() != 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")

    raw = _raw_config(_config_map_of(workload, container))
    for (host, port), _ in _listen(raw["dns"]["listen"]):
        if port < 1024:  # allowed to a non-root user by the pod's sysctl only
            sysctls = {s["name"]: s["value"] for s in pod["securityContext"]["sysctls"]}
            assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= port, host

    # Writable: only the emptyDirs for state and /tmp.
    for path in (STATE_DIR, "/tmp"):
        assert "emptyDir" in _volume(pod, _mount(container, path)["name"])
    assert raw["registrations"]["state_file"].startswith(STATE_DIR + "/")
    assert raw["snapshot"]["file"].startswith(STATE_DIR + "/")
    assert _mount(container, CONFIG_DIR)["readOnly"] is True

    # The API token reaches resolverd only, as what in_cluster config reads.
    assert pod["automountServiceAccountToken"] is False
    sources = _volume(pod, _mount(container, TOKEN_DIR)["name"])["projected"]["sources"]
    files: set[str] = set()
    for source in sources:
        for projection in source.values():  # serviceAccountToken, configMap, downwardAPI
            files |= {projection["path"]} if "path" in projection else set()
            files |= {item["path"] for item in projection.get("items", [])}
    assert files == {"token", "ca.crt", "namespace"}
    for other in _containers(pod):
        if other is not container:
            assert all(m["mountPath"] != TOKEN_DIR for m in other.get("volumeMounts", []))


def _listen(value: str | list[str]) -> list[tuple[tuple[str, int], str]]:
    items = [value] if isinstance(value, str) else value
    return [(parse_hostport(item, default_port=53), item) for item in items]


# --------------------------------------------------------------------------- the sidecar


def _sidecar() -> tuple[Manifest, Manifest]:
    workload = _one("Deployment", "web")
    return workload, _container(_pod(workload), "resolverd")


def test_sidecar_is_the_pods_only_nameserver() -> None:
    workload, container = _sidecar()
    pod = _pod(workload)
    assert pod["dnsPolicy"] == "None"
    assert pod["dnsConfig"]["nameservers"] == ["127.0.0.1"]
    # resolverd's zone first, so a bare service name gets resolverd's answer.
    assert pod["dnsConfig"]["searches"][0] == "resolverd.internal"
    assert {"name": "ndots", "value": "2"} in pod["dnsConfig"]["options"]

    raw = _raw_config(_config_map_of(workload, container))
    assert [address for address, _ in _listen(raw["dns"]["listen"])] == [("127.0.0.1", 53)]
    assert raw["dns"]["domains"][0] == pod["dnsConfig"]["searches"][0]
    # resolv.conf lists only resolverd itself: the cluster DNS must be given.
    assert raw["dns"]["forward"]["upstreams"]
    assert "allow" not in raw["dns"]["forward"], "recursion for the pod itself only"
    assert [parse_hostport(raw["api"]["listen"], default_port=50051)] == [("127.0.0.1", 50051)]


def test_sidecar_starts_before_the_app() -> None:
    """A native sidecar: an init container that keeps running, whose startup
    probe holds back the app container (and its first DNS lookup)."""
    workload, container = _sidecar()
    pod = _pod(workload)
    assert container in pod.get("initContainers", [])
    assert container["restartPolicy"] == "Always"
    assert pod["initContainers"][0] is container
    assert [c["name"] for c in pod["containers"]] == ["app"]


# --------------------------------------------------------------------------- the DaemonSet


def test_daemonset_serves_the_pods_of_its_node() -> None:
    daemonset = _one("DaemonSet", "resolverd-node")
    container = _container(_pod(daemonset), "resolverd")
    service = _one("Service", "resolverd-node-local")
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    assert not _pod(daemonset).get("hostNetwork")

    raw = _raw_config(_config_map_of(daemonset, container))
    (((host, dns_port), _),) = _listen(raw["dns"]["listen"])
    assert host == "0.0.0.0"
    ports = {p["name"]: p for p in container["ports"]}
    served = {(p["port"], p["protocol"]) for p in service["spec"]["ports"]}
    assert served == {(53, "UDP"), (53, "TCP")}
    for port in service["spec"]["ports"]:
        assert ports[port["targetPort"]]["containerPort"] == dns_port

    # Clients are other pods: they must be allowed to recurse.
    assert any(not net.startswith("127.") for net in raw["dns"]["forward"]["allow"])
    assert raw["dns"]["forward"]["upstreams"]

    # The app's nameserver is the Service's fixed ClusterIP.
    client = _pod(_one("Deployment", "web-node-dns"))
    assert client["dnsPolicy"] == "None"
    assert client["dnsConfig"]["nameservers"] == [service["spec"]["clusterIP"]]

    # Updates start the new pod before stopping the old one.
    rolling = daemonset["spec"]["updateStrategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)


# --------------------------------------------------------------------------- the resolverd configs


def _config_maps() -> list[Manifest]:
    return [doc for doc in _all("ConfigMap") if CONFIG_KEY in doc.get("data", {})]


@pytest.mark.parametrize("config_map", _config_maps(), ids=_id)
def test_config_is_accepted_by_resolverd(config_map: Manifest, tmp_path: Path) -> None:
    """The same loader as `resolverd run` (duplicate keys rejected too)."""
    file = tmp_path / CONFIG_KEY
    file.write_text(config_map["data"][CONFIG_KEY], encoding="utf-8")
    config: Config = load_config(file)

    (provider,) = config.providers
    assert provider.type == "kubernetes"
    assert provider.options["in_cluster"] is True
    assert provider.options["kubeconfig"] is None
    assert provider.options["namespaces"] == ("default",)
    assert config.dns.forward.upstreams, "dnsPolicy None: resolv.conf has no cluster DNS"
    assert config.api.listen == (("127.0.0.1", 50051),)
    assert config.api.token is None and config.api.tls is None  # nothing to mount
    assert config.metrics.listen == ("0.0.0.0", METRICS_PORT)  # where the kubelet probes
    assert config.snapshot.file is not None
    assert config.snapshot.file.startswith(STATE_DIR + "/")
    assert config.registrations.state_file.startswith(STATE_DIR + "/")


def test_every_config_is_mounted() -> None:
    mounted = {_config_map_of(w, c)["metadata"]["name"] for w, c in RESOLVERD}
    assert mounted == {c["metadata"]["name"] for c in _config_maps()}


# --------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "a continued line at the end"
    found: list[tuple[str, str]] = []
    for line in filter(str.strip, lines):
        keyword, _, args = line.strip().partition(" ")
        found.append((keyword.upper(), " ".join(args.split())))
    return found


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _dockerfile_user() -> int:
    users = [args for keyword, args in _stages()[-1] if keyword == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), "a numeric USER, so that runAsNonRoot can check it"
    return int(user)


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    args = dict(a.split("=", 1) for k, a in _instructions() if k == "ARG" and "=" in a)
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        assert image.startswith("python:3.11-slim"), image
    final = dict(stages[-1])
    assert "COPY" in final and "--from=" in final["COPY"], "the runtime copies the build's venv"
    assert not any(k == "RUN" and "pip install" in a for k, a in stages[-1]), "no pip at runtime"


def test_dockerfile_installs_the_package_without_test_dependencies() -> None:
    build = _stages()[0]
    copied = {
        source
        for keyword, args in build
        if keyword == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    }
    readme = _pyproject()["project"]["readme"]
    assert {"pyproject.toml", readme, "resolverd"} <= copied
    installs = [args for keyword, args in build if keyword == "RUN" and "pip install" in args]
    assert installs
    assert not any("[test]" in args or "-e " in args for args in installs)
    # What the build copies must be in the build context.
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied:
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    for heavy in (".git", ".venv", "tests"):
        assert heavy in ignored


def test_dockerfile_runs_resolverd_as_a_user_and_exposes_its_ports() -> None:
    assert _dockerfile_user() != 0
    exposed = {
        port for keyword, args in _stages()[-1] if keyword == "EXPOSE" for port in args.split()
    }
    assert exposed == {"53/udp", "53/tcp", "50051", "9153"}


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = [args for keyword, args in _stages()[-1] if keyword == "ENTRYPOINT"]
    command = json.loads(entrypoint)  # the exec form: signals reach resolverd
    assert command == ["resolverd", "run", "-c", f"{CONFIG_DIR}/{CONFIG_KEY}"]
    assert _pyproject()["project"]["scripts"][command[0]] == "resolverd.cli:main"
    assert callable(cli.main)
    parsed = cli._parser().parse_args(command[1:])
    assert (parsed.command, parsed.config) == ("run", f"{CONFIG_DIR}/{CONFIG_KEY}")
    # ... which is where the manifests mount the config.
    for workload, container in RESOLVERD:
        assert container.get("command") is None and container.get("args") is None
        volume = _volume(_pod(workload), _mount(container, CONFIG_DIR)["name"])
        assert [item["path"] for item in volume["configMap"]["items"]] == [CONFIG_KEY]
