"""The k3s deployment as a cluster would get it: every overlay rendered by `kubectl kustomize` (its
secretGenerators fed dummy files in place of the git-ignored secrets/), the output validated against
the Kubernetes OpenAPI schemas, and then read as the kubelet would run it, container by container:

- each service's settings, loaded by shared/config.py from the environment the container gets (its
  image's ENV from the Dockerfile, its ConfigMaps, its env) and the secret files mounted at its
  EDGEFLEET_SECRETS_DIR, hold the credentials it uses (broker passwords, S3 keys, TLS files);
- every path a setting or a broker config names is on a volume that exists and holds that file;
- every folder a container writes is writable by its uid (fsGroup for emptyDirs and claims, an init
  step that chowns a hostPath, since fsGroup does not reach hostPaths), every secret file readable by
  the user that reads it (Kubernetes makes them root-owned, group fsGroup, mode defaultMode);
- every container is locked down (no privilege escalation, all capabilities dropped, non-root, a
  read-only root filesystem with its own /tmp for the health file).

The checks return the problems they find, so the last test breaks a rendered overlay on purpose
(drops the fsGroup, a mount, the S3 secret, ...) and sees each one caught.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from shared import config

REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33.0"
OVERLAYS = sorted(p.parent.name for p in (REPO / "k3s" / "overlays").glob("*/kustomization.yaml"))
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# The settings each service's container loads (edgefleet/cli/services.py), and what it writes.
SETTINGS = {"inference": config.InferenceSettings, "sync": config.SyncSettings,
            "telemetry": config.TelemetrySettings, "cloud-ingest": config.IngestSettings,
            "console": config.ConsoleSettings}
WRITES = {"model_store": "folder", "outbox_path": "parent", "health_file": "parent"}
# The heartbeat the probes read (the images set it: /tmp/edgefleet.alive).
HEALTH_FILE_ENV = f"{config.ENV_PREFIX}HEALTH_FILE"
# Where enrolment puts a device's files on an edge node (k3s/overlays/edge/kustomization.yaml, README).
NODE_LAYOUT = {"seed_model_dir": "/var/lib/edgefleet/models/efficientnet-lite0"}
# Variables the services read besides their settings' keys.
NOT_SETTINGS = {config.SECRETS_DIR_ENV, config.CONFIG_FILE_ENV, HEALTH_FILE_ENV}
# MinIO makes its certificates folder under $HOME when it starts: its root filesystem stays writable.
WRITABLE_ROOT = {"minio/minio"}
# What an init step that prepares hostPaths may hold: chown, and reading folders a service made 0700.
INIT_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
BROKER_PATHS = ("password_file", "acl_file", "certfile", "keyfile", "cafile", "crlfile", "include_dir",
                "persistence_location")
DEFAULT_FILE_MODE = 0o644  # Kubernetes' defaultMode for secret, configMap and projected volumes
METRICS_PORT_ENV = f"{config.ENV_PREFIX}METRICS_PORT"
PROMETHEUS_K3S = REPO / "deploy" / "prometheus" / "prometheus-k3s.yml"


# ---------------------------------------------------------------------------------------------------
# Rendering


def _kubectl() -> str:
    tool = shutil.which("kubectl")
    if tool is None:
        message = "kubectl is not installed (Debian's kubernetes-client, which scripts/engine.sh installs)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return tool


def _generated_files(kustomization: dict) -> list[str]:
    """The files a kustomization's secretGenerators and configMapGenerators read (key=path or path)."""
    files = []
    for generator in kustomization.get("secretGenerator", []) + kustomization.get("configMapGenerator", []):
        files += [entry.split("=", 1)[-1] for entry in generator.get("files", [])]
    return files


def render(overlay: str, tmp_path: Path) -> list[dict]:
    """`kubectl kustomize` of a copy of k3s/ with every generated file present; the rendered objects."""
    tool = _kubectl()
    tree = tmp_path / f"k3s-{overlay}"
    shutil.copytree(REPO / "k3s", tree, ignore=shutil.ignore_patterns("secrets"))
    folder = tree / "overlays" / overlay
    for name in _generated_files(yaml.safe_load((folder / "kustomization.yaml").read_text())):
        assert name.startswith("secrets/"), f"{overlay}: {name} is generated from outside the git-ignored secrets/"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"dummy-{Path(name).name}\n")
    result = subprocess.run([tool, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return {overlay: render(overlay, tmp_path_factory.mktemp("render")) for overlay in OVERLAYS}


# ---------------------------------------------------------------------------------------------------
# The images' defaults, from the Dockerfile the images are built from


def _dockerfile_stages() -> dict[str, dict]:
    """Each stage: its parent stage (or None), its ENV and its WORKDIR."""
    stages: dict[str, dict] = {}
    current = None
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        instruction, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        if instruction == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
            current = stages[name] = {"parent": parts[0] if parts[0] in stages else None, "env": {}, "workdir": "/"}
        elif instruction == "ENV" and current is not None:
            current["env"].update(dict(pair.split("=", 1) for pair in shlex.split(rest) if "=" in pair))
        elif instruction == "WORKDIR" and current is not None:
            current["workdir"] = rest.strip()
    return stages


STAGES = _dockerfile_stages()


def image_defaults(image: str) -> tuple[dict[str, str], str]:
    """The ENV (EDGEFLEET_* only) and WORKDIR an edgefleet/<target> image is built with."""
    target = image.split("/", 1)[1].split(":")[0]
    chain, stage = [], STAGES.get(target)
    assert stage is not None, f"{image}: no Dockerfile target {target!r}"
    while stage is not None:
        chain.append(stage)
        stage = STAGES.get(stage["parent"]) if stage["parent"] else None
    env = {}
    for stage in reversed(chain):
        env.update({k: v for k, v in stage["env"].items() if k.startswith(config.ENV_PREFIX)})
    workdir = next((s["workdir"] for s in chain if s["workdir"] != "/"), "/")
    return env, workdir


# ---------------------------------------------------------------------------------------------------
# The rendered objects, read as the kubelet reads them


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@dataclass
class Pod:
    """One pod a workload makes: its spec, the values its downward-API fields take, its annotations."""

    workload: str
    spec: dict
    fields: dict[str, str]
    docs: list[dict]
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def volumes(self) -> dict[str, dict]:
        return {v["name"]: v for v in self.spec.get("volumes", [])}

    def containers(self, init: bool = False) -> list[dict]:
        return self.spec.get("initContainers" if init else "containers", [])


def pods(docs: list[dict]) -> list[Pod]:
    """Every pod the workloads make; a StatefulSet's once per replica (their names differ)."""
    found = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]["template"]["spec"]
        names = ([f"{name}-{i}" for i in range(doc["spec"].get("replicas", 1))] if doc["kind"] == "StatefulSet"
                 else [f"{name}-abcde"])
        found.extend(Pod(f"{doc['kind']}/{name}", spec,
                         {"metadata.name": pod_name, "spec.nodeName": "node-1",
                          "metadata.namespace": doc["metadata"].get("namespace", "")}, docs,
                         doc["spec"]["template"].get("metadata", {}).get("annotations", {}))
                     for pod_name in names)
    return found


def security(pod: Pod, container: dict) -> dict:
    """The container's effective security settings: its own over the pod's."""
    return {**pod.spec.get("securityContext", {}), **container.get("securityContext", {})}


def identity(pod: Pod, container: dict) -> tuple[int | None, set[int]]:
    """The uid a container runs as and the groups it is in (fsGroup reaches every container)."""
    sc = security(pod, container)
    pod_sc = pod.spec.get("securityContext", {})
    groups = {g for g in (sc.get("runAsGroup"), pod_sc.get("fsGroup")) if g is not None}
    return sc.get("runAsUser"), groups | set(pod_sc.get("supplementalGroups", []))


def _decoded(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return data | secret.get("stringData", {})


def volume_files(pod: Pod, volume: dict) -> dict[str, tuple[int, str]] | None:
    """The files a secret, configMap or projected volume holds: path -> (mode, content). None for
    volumes whose content the cluster does not decide (emptyDir, hostPath, claims). Raises
    AssertionError for a Secret or ConfigMap that is not in the rendered output."""
    def source(kind: str, name: str, items: list | None, default_mode: int) -> dict[str, tuple[int, str]]:
        obj = objects(pod.docs, kind).get(name)
        assert obj is not None, f"{pod.workload}: volume {volume['name']} names {kind} {name!r}, which is not rendered"
        data = _decoded(obj) if kind == "Secret" else obj.get("data", {})
        if items is None:
            return {key: (default_mode, value) for key, value in data.items()}
        out = {}
        for item in items:
            assert item["key"] in data, f"{pod.workload}: {kind} {name} has no key {item['key']!r}"
            out[item["path"]] = (item.get("mode", default_mode), data[item["key"]])
        return out

    if "secret" in volume:
        s = volume["secret"]
        return source("Secret", s["secretName"], s.get("items"), s.get("defaultMode", DEFAULT_FILE_MODE))
    if "configMap" in volume:
        c = volume["configMap"]
        return source("ConfigMap", c["name"], c.get("items"), c.get("defaultMode", DEFAULT_FILE_MODE))
    if "projected" in volume:
        mode, files = volume["projected"].get("defaultMode", DEFAULT_FILE_MODE), {}
        for src in volume["projected"]["sources"]:
            for kind, key in (("Secret", "secret"), ("ConfigMap", "configMap")):
                if key in src:
                    files |= source(kind, src[key]["name"], src[key].get("items"), mode)
        return files
    return None


@dataclass
class Place:
    """Where a path in a container lands: the mount, its volume and the path inside the volume."""

    mount: dict
    volume: dict
    inside: str
    files: dict[str, tuple[int, str]] | None = field(default=None)

    @property
    def kind(self) -> str:
        return next(k for k in ("secret", "configMap", "projected", "emptyDir", "hostPath", "persistentVolumeClaim")
                    if k in self.volume)


def place(pod: Pod, container: dict, path: str) -> Place | None:
    """The mount a path is on (the longest mountPath that holds it), or None: the image's own file system."""
    target = PurePosixPath(path)
    best = None
    for mount in container.get("volumeMounts", []):
        at = PurePosixPath(mount["mountPath"])
        if (target == at or at in target.parents) and (best is None
                                                      or len(at.parts) > len(PurePosixPath(best["mountPath"]).parts)):
            best = mount
    if best is None:
        return None
    volume = pod.volumes.get(best["name"])
    assert volume is not None, \
        f"{pod.workload}/{container['name']}: mount of volume {best['name']!r}, which the pod lacks"
    inside = str(target.relative_to(best["mountPath"])) if target != PurePosixPath(best["mountPath"]) else ""
    if best.get("subPath"):
        inside = str(PurePosixPath(best["subPath"]) / inside) if inside else best["subPath"]
    return Place(best, volume, "" if inside == "." else inside, volume_files(pod, volume))


def init_owners(pod: Pod) -> dict[str, set[int]]:
    """Volume name -> the uids init containers chown it to (`chown [-R] UID[:GID] PATH...` in their command)."""
    owners: dict[str, set[int]] = {}
    for init in pod.containers(init=True):
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in init.get("volumeMounts", [])}
        script = " ".join(init.get("command", []) + init.get("args", []))
        for step in re.split(r"&&|;|\|\|", script):
            words = step.split()
            if "chown" not in words:
                continue
            args = [w for w in words[words.index("chown") + 1:] if not w.startswith("-")]
            uid = int(args[0].split(":")[0])
            for path in args[1:]:
                if path.rstrip("/") in mounts:
                    owners.setdefault(mounts[path.rstrip("/")], set()).add(uid)
    return owners


def readable(pod: Pod, container: dict, where: Place, path: str) -> list[str]:
    """A file (or every file of a folder) the container reads."""
    uid, groups = identity(pod, container)
    who = f"{pod.workload}/{container['name']}"
    if where.files is not None:
        inside = where.inside.rstrip("/")
        entries = ({inside: where.files[inside]} if inside in where.files else
                   {f: e for f, e in where.files.items() if inside == "" or f.startswith(inside + "/")})
        if not entries:
            return [f"{who}: {path} is not in volume {where.volume['name']} (it holds {sorted(where.files)})"]
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        problems = []
        for name, (mode, _) in entries.items():
            # Root-owned, group fsGroup where the pod has one (the kubelet's atomic writer), mode as
            # given. (With an fsGroup the kubelet also adds group read to any mode; that is not counted
            # on here: the manifests say what they mean.)
            if not (uid == 0 or mode & 0o004 or (mode & 0o040 and fs_group is not None and fs_group in groups)):
                problems.append(f"{who} (uid {uid}, groups {sorted(groups)}) cannot read "
                                f"{path.rstrip('/')}{'/' + name if name != inside else ''}: mode {mode:04o}, "
                                f"owner root, group {fs_group}")
        return problems
    if where.kind == "hostPath" and uid != 0 and uid not in init_owners(pod).get(where.volume["name"], set()):
        return [f"{who} (uid {uid}) reads hostPath {where.volume['hostPath']['path']} ({path}), which no init step "
                f"chowns to it (fsGroup does not apply to hostPaths)"]
    return []


def writable(pod: Pod, container: dict, path: str) -> list[str]:
    """A folder the container writes into."""
    uid, _ = identity(pod, container)
    who = f"{pod.workload}/{container['name']}"
    where = place(pod, container, path)
    if where is None:
        return [f"{who} writes {path}, which is on no volume"
                + ("" if not security(pod, container).get("readOnlyRootFilesystem")
                   else " (the root filesystem is read-only)")]
    if where.mount.get("readOnly"):
        return [f"{who} writes {path}, mounted read-only"]
    if uid == 0:
        return []
    fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
    if where.kind in ("emptyDir", "persistentVolumeClaim"):
        return [] if fs_group is not None else [f"{who} (uid {uid}) writes {where.kind} {where.volume['name']} "
                                                f"({path}) and the pod has no fsGroup"]
    if where.kind == "hostPath":
        if uid in init_owners(pod).get(where.volume["name"], set()):
            return []
        return [f"{who} (uid {uid}) writes hostPath {where.volume['hostPath']['path']} ({path}), which no init step "
                f"chowns to it (fsGroup does not apply to hostPaths)"]
    return [f"{who} writes {path} on {where.kind} volume {where.volume['name']}, which is read-only"]


def environment(pod: Pod, container: dict) -> dict[str, str]:
    """The variables the container's process sees: its image's, then envFrom, then env ($(VAR) expanded)."""
    who = f"{pod.workload}/{container['name']}"
    env = image_defaults(container["image"])[0] if container["image"].startswith("edgefleet/") else {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        obj = objects(pod.docs, kind).get(ref["name"])
        assert obj is not None, f"{who}: envFrom names {kind} {ref['name']!r}, which is not rendered"
        env.update(_decoded(obj) if kind == "Secret" else obj.get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = pod.fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = var["valueFrom"].get("secretKeyRef") or var["valueFrom"].get("configMapKeyRef")
            kind = "Secret" if "secretKeyRef" in var["valueFrom"] else "ConfigMap"
            obj = objects(pod.docs, kind).get(ref["name"])
            assert obj is not None and ref["key"] in (_decoded(obj) if kind == "Secret" else obj.get("data", {})), \
                f"{who}: {var['name']} from {kind} {ref['name']}/{ref['key']}, which is not rendered"
            env[var["name"]] = (_decoded(obj) if kind == "Secret" else obj["data"])[ref["key"]]
    return env


def _service(container: dict) -> str | None:
    if not container["image"].startswith("edgefleet/"):
        return None
    args = container.get("args") or container.get("command") or []
    return args[0] if args else None


# ---------------------------------------------------------------------------------------------------
# The checks: each returns the problems it finds in one overlay's rendered objects


def check_lockdown(docs: list[dict]) -> list[str]:
    problems = []
    for pod in pods(docs):
        for init in (False, True):
            for c in pod.containers(init):
                sc, who = security(pod, c), f"{pod.workload}/{c['name']}"
                caps = sc.get("capabilities", {})
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{who}: allowPrivilegeEscalation is not false")
                if "ALL" not in caps.get("drop", []):
                    problems.append(f"{who}: capabilities do not drop ALL")
                if set(caps.get("add", [])) - (INIT_CAPABILITIES if init else set()):
                    problems.append(f"{who}: adds capabilities {caps['add']}")
                if not init and (sc.get("runAsUser") in (None, 0) or sc.get("runAsNonRoot") is not True):
                    problems.append(f"{who}: not pinned to a non-root uid (runAsNonRoot, runAsUser)")
                if c["image"].split(":")[0] not in WRITABLE_ROOT and sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{who}: the root filesystem is writable")
    return problems


HEALTH_COMMANDS = (["edgefleet", "health"], ["python", "-m", "shared.health"])


def check_health_files(docs: list[dict]) -> list[str]:
    """Each service's heartbeat: on its own writable /tmp (no other container's), and what its probes read."""
    problems = []
    for pod in pods(docs):
        for c in pod.containers():
            if _service(c) is None:
                continue
            who, health = f"{pod.workload}/{c['name']}", environment(pod, c).get(HEALTH_FILE_ENV)
            if health is None:
                problems.append(f"{who}: no {HEALTH_FILE_ENV}")
                continue
            folder = str(PurePosixPath(health).parent)
            problems += writable(pod, c, folder)
            where = place(pod, c, folder)
            if where is not None:
                if where.kind != "emptyDir":
                    problems.append(f"{who}: its health file's folder {folder} is on a {where.kind}, "
                                    "not its own emptyDir")
                sharing = [o["name"] for o in pod.containers() if o is not c
                           and any(m["name"] == where.volume["name"] for m in o.get("volumeMounts", []))]
                if sharing:
                    problems.append(f"{who}: {folder} is shared with {sharing}, whose heartbeat would count as its own")
            for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
                command = c.get(probe, {}).get("exec", {}).get("command", [])
                prefix = next((p for p in HEALTH_COMMANDS if command[:len(p)] == p), None)
                if prefix and health not in command[len(prefix):]:
                    problems.append(f"{who}: its {probe} reads {command[len(prefix):]}, not {health}")
            if not c.get("livenessProbe"):
                problems.append(f"{who}: no livenessProbe")
    return problems


def _settings(pod: Pod, c: dict, secrets_copy: Path) -> tuple[config.CommonSettings | None, list[str]]:
    """The service's settings, loaded by shared/config.py from what the container gets."""
    who, env = f"{pod.workload}/{c['name']}", environment(pod, c)
    cls = SETTINGS[_service(c)]
    problems = [f"{who}: {k} is no setting of {cls.__name__}" for k in env
                if k.startswith(config.ENV_PREFIX) and k not in NOT_SETTINGS
                and k[len(config.ENV_PREFIX):].lower() not in config.keys(cls)]
    secrets = env.get(config.SECRETS_DIR_ENV)
    if secrets is not None:
        where = place(pod, c, secrets)
        if where is None or where.files is None:
            return None, problems + [f"{who}: {config.SECRETS_DIR_ENV}={secrets} is not a mounted secret"]
        shutil.rmtree(secrets_copy, ignore_errors=True)
        secrets_copy.mkdir(parents=True)
        for name, (_, content) in where.files.items():
            if "/" in name:
                continue
            key = name[len(config.ENV_PREFIX):] if name.upper().startswith(config.ENV_PREFIX) else None
            if key is None or key.lower() not in config.keys(cls):
                problems.append(f"{who}: secret file {secrets}/{name} is no setting of {cls.__name__}")
            problems += readable(pod, c, where, f"{secrets}/{name}")
            (secrets_copy / name).write_text(content)
        env = {**env, config.SECRETS_DIR_ENV: str(secrets_copy)}
    saved = {k: v for k, v in os.environ.items() if k.startswith(config.ENV_PREFIX)}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.startswith(config.ENV_PREFIX)})
        return config.load(cls), problems
    except config.ConfigError as exc:
        return None, problems + [f"{who}: {exc}"]
    finally:
        for k in [k for k in os.environ if k.startswith(config.ENV_PREFIX)]:
            del os.environ[k]
        os.environ.update(saved)


def check_file_variables(docs: list[dict]) -> list[str]:
    """Any container's *_FILE variable (MinIO's root keys, the services' TLS files) names a file it can read."""
    problems = []
    for pod in pods(docs):
        for c in pod.containers():
            for name, value in environment(pod, c).items():
                if not name.endswith("_FILE") or name == HEALTH_FILE_ENV or not value.startswith("/"):
                    continue
                where = place(pod, c, value)
                if where is None:
                    problems.append(f"{pod.workload}/{c['name']}: {name}={value}, which is on no volume")
                else:
                    problems += readable(pod, c, where, value)
    return problems


def check_settings(docs: list[dict], scratch: Path) -> list[str]:
    """Each service gets the credentials it uses, and every path it reads or writes."""
    problems = []
    for pod in pods(docs):
        for c in pod.containers():
            if _service(c) not in SETTINGS:
                continue
            who = f"{pod.workload}/{c['name']}"
            settings, found = _settings(pod, c, scratch / "secrets")
            problems += found
            if settings is None:
                continue
            if settings.mqtt.username and settings.mqtt.password is None:
                problems.append(f"{who}: broker user {settings.mqtt.username} and no password")
            if (isinstance(settings, config.TelemetrySettings) and settings.cloud_mqtt.username
                    and settings.cloud_mqtt.password is None):
                problems.append(f"{who}: cloud broker user {settings.cloud_mqtt.username} and no password")
            if isinstance(settings, config.StoreSettings) and (settings.s3.access_key_id is None
                                                               or settings.s3.secret_access_key is None):
                problems.append(f"{who}: reads S3 and has no S3 key pair (there is no instance role on k3s)")
            if settings.mqtt.tls and settings.mqtt.ca_file is None:
                problems.append(f"{who}: mqtts and no CA file")
            if (settings.mqtt.cert_file is None) != (settings.mqtt.key_file is None):
                problems.append(f"{who}: a client certificate without its key, or a key without its certificate")
            workdir = image_defaults(c["image"])[1]
            for name, value in config.flat_values(settings).items():
                if not isinstance(value, Path):
                    continue
                path = str(PurePosixPath(workdir) / value)
                if name in WRITES:
                    problems += writable(pod, c, path if WRITES[name] == "folder" else str(PurePosixPath(path).parent))
                    continue
                where = place(pod, c, path)
                if where is None:
                    problems.append(f"{who}: {name} = {path}, which is on no volume")
                    continue
                problems += readable(pod, c, where, path)
                if where.kind == "hostPath" and name in NODE_LAYOUT:
                    on_node = str(PurePosixPath(where.volume["hostPath"]["path"]) / where.inside)
                    if on_node != NODE_LAYOUT[name]:
                        problems.append(f"{who}: {name} = {path} is {on_node} on the node, not {NODE_LAYOUT[name]}")
    return problems


def check_brokers(docs: list[dict]) -> list[str]:
    """Every Mosquitto: each file its config names is mounted (and readable, its data folder writable),
    each listener is a container port; a DaemonSet's TLS listener is on the node's network (hostPort)."""
    problems = []
    for pod in pods(docs):
        for c in pod.containers():
            if not c["image"].startswith("eclipse-mosquitto"):
                continue
            who, args = f"{pod.workload}/{c['name']}", c.get("args", [])
            conf_path = args[args.index("-c") + 1]
            where = place(pod, c, conf_path)
            if where is None or where.files is None or where.inside not in where.files:
                problems.append(f"{who}: its config {conf_path} is not mounted")
                continue
            problems += readable(pod, c, where, conf_path)
            ports = {p["containerPort"]: p for p in c.get("ports", [])}
            listener, tls_listeners = None, set()
            for line in where.files[where.inside][1].splitlines():
                words = line.split()
                if not words or words[0].startswith("#"):
                    continue
                if words[0] == "listener":
                    listener = int(words[1])
                    if listener not in ports:
                        problems.append(f"{who}: listener {listener} is no containerPort")
                elif words[0] == "certfile" and listener is not None:
                    tls_listeners.add(listener)
                if words[0] not in BROKER_PATHS:
                    continue
                path = words[1]
                if words[0] == "persistence_location":
                    problems += writable(pod, c, path.rstrip("/"))
                    continue
                target = place(pod, c, path.rstrip("/"))
                if target is None:
                    problems.append(f"{who}: {words[0]} {path} is not mounted")
                else:
                    problems += readable(pod, c, target, path)
            if pod.workload.startswith("DaemonSet/"):
                for port in tls_listeners:
                    if ports.get(port, {}).get("hostPort") != port:
                        problems.append(f"{who}: TLS listener {port} is not on the node's port {port} (hostPort)")
    return problems


def check_images(docs: list[dict]) -> list[str]:
    """edgefleet images: a Dockerfile target each, pinned to the release (the package's version)."""
    problems = []
    for pod in pods(docs):
        for c in pod.containers():
            if c["image"].startswith("edgefleet/"):
                name, _, tag = c["image"].partition(":")
                if name.split("/", 1)[1] not in STAGES:
                    problems.append(f"{pod.workload}/{c['name']}: {name} is no Dockerfile target")
                if tag != VERSION:
                    problems.append(f"{pod.workload}/{c['name']}: {c['image']} is not pinned to {VERSION}")
    return problems


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus's relabelling (the keep, drop and replace actions) of one target's labels; None: dropped."""
    labels = dict(labels)
    for step in configs:
        value = step.get("separator", ";").join(labels.get(name, "") for name in step.get("source_labels", []))
        match = re.fullmatch(step.get("regex", "(.*)"), value)
        action = step.get("action", "replace")
        if action in ("keep", "drop"):
            if (match is None) == (action == "keep"):
                return None
        elif action == "replace":
            if match is not None:
                result = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", step.get("replacement", "$1")))
                if result:
                    labels[step["target_label"]] = result
                else:
                    labels.pop(step["target_label"], None)
        else:
            raise AssertionError(f"relabel action {action} is not simulated here")
    return labels


def scrape_targets(pod: Pod) -> set[tuple[str, int, str]]:
    """What deploy/prometheus/prometheus-k3s.yml scrapes in a pod: (container, port, path) for each
    container port its kubernetes_sd (role: pod) finds and its relabelling keeps."""
    config = yaml.safe_load(PROMETHEUS_K3S.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "edgefleet-pods")
    annotations = pod.annotations
    meta = {"__meta_kubernetes_namespace": pod.fields["metadata.namespace"],
            "__meta_kubernetes_pod_name": pod.fields["metadata.name"], "__meta_kubernetes_pod_node_name": "node-1",
            "__metrics_path__": "/metrics"}
    for key, value in annotations.items():
        meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    found = set()
    for c in pod.containers():
        for port in c.get("ports", []):
            labels = relabel({**meta, "__meta_kubernetes_pod_container_name": c["name"],
                              "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                              "__address__": f"10.0.0.1:{port['containerPort']}"}, job["relabel_configs"])
            if labels is not None:
                found.add((c["name"], int(labels["__address__"].rsplit(":", 1)[1]), labels["__metrics_path__"]))
    return found


def check_metrics(docs: list[dict]) -> list[str]:
    """Prometheus finds every service's metrics: each edgefleet service sets EDGEFLEET_METRICS_PORT, and
    the k3s scrape config (deploy/prometheus/prometheus-k3s.yml) applied to its pod scrapes that port,
    at /metrics, and no other; a pod's prometheus.io/port annotation names one of its metrics ports."""
    problems = []
    for pod in pods(docs):
        wanted = set()
        for c in pod.containers():
            if _service(c) not in SETTINGS:
                continue
            port = environment(pod, c).get(METRICS_PORT_ENV)
            if port is None:
                problems.append(f"{pod.workload}/{c['name']}: no {METRICS_PORT_ENV}")
                continue
            wanted.add((c["name"], int(port), "/metrics"))
        found = scrape_targets(pod)
        for container, port, _ in sorted(wanted - found):
            problems.append(f"{pod.workload}/{container}: Prometheus does not scrape its metrics port {port}")
        for container, port, path in sorted(found - wanted):
            problems.append(f"{pod.workload}/{container}: Prometheus scrapes port {port} ({path}), no metrics port")
        annotated = pod.annotations.get("prometheus.io/port")
        if annotated is not None and int(annotated) not in {port for _, port, _ in wanted}:
            problems.append(f"{pod.workload}: prometheus.io/port {annotated} is no metrics port of its services")
    return problems


def all_problems(docs: list[dict], scratch: Path) -> list[str]:
    return (check_lockdown(docs) + check_health_files(docs) + check_file_variables(docs) + check_settings(docs, scratch)
            + check_brokers(docs) + check_images(docs) + check_metrics(docs))


# ---------------------------------------------------------------------------------------------------
# The tests


def test_the_overlays_are_found():
    assert OVERLAYS == ["cloud", "edge"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_its_output_validates(rendered, overlay):
    docs = rendered[overlay]
    assert {d["kind"] for d in docs} >= {"Secret", "ConfigMap"}
    for document in docs:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert all(d["metadata"].get("namespace") == f"edgefleet-{overlay}" for d in docs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(rendered, overlay):
    assert check_lockdown(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_has_its_own_writable_tmp_for_the_health_file_its_probes_read(rendered, overlay):
    assert check_health_files(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_gets_the_credentials_files_and_writable_folders_its_settings_name(rendered, overlay, tmp_path):
    assert check_settings(rendered[overlay], tmp_path) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_file_variable_names_a_mounted_readable_file(rendered, overlay):
    assert check_file_variables(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_broker_gets_the_files_its_config_names_and_exposes_its_listeners(rendered, overlay):
    assert check_brokers(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_every_services_metrics_port_and_nothing_else(rendered, overlay):
    assert check_metrics(rendered[overlay]) == []
    assert any(scrape_targets(pod) for pod in pods(rendered[overlay]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_edgefleet_image_is_a_dockerfile_target_pinned_to_the_release(rendered, overlay):
    assert check_images(rendered[overlay]) == []


def test_edge_sync_reads_s3_with_the_devices_own_key_pair_not_the_stores_root_keys(rendered):
    edge, cloud = rendered["edge"], rendered["cloud"]
    pod = next(p for p in pods(edge) if p.workload == "DaemonSet/edgefleet-edge")
    sync = next(c for c in pod.containers() if _service(c) == "sync")
    where = place(pod, sync, environment(pod, sync)[config.SECRETS_DIR_ENV])
    assert {"edgefleet_s3_access_key_id", "edgefleet_s3_secret_access_key"} <= set(where.files)
    sources = [s["secret"]["name"] for s in where.volume.get("projected", {}).get("sources", []) if "secret" in s]
    assert "edgefleet-sync-s3" in sources
    # The store's root keys (MinIO's, the cloud's edgefleet-s3) come from other files than the device's.
    root = {m["secretName"] for m in (v["secret"] for p in pods(cloud) for v in p.volumes.values() if "secret" in v)}
    assert "edgefleet-s3" in root
    edge_kustomization = yaml.safe_load((REPO / "k3s/overlays/edge/kustomization.yaml").read_text())
    cloud_kustomization = yaml.safe_load((REPO / "k3s/overlays/cloud/kustomization.yaml").read_text())
    device_files = set(next(g for g in edge_kustomization["secretGenerator"]
                            if g["name"] == "edgefleet-sync-s3")["files"])
    root_files = set(next(g for g in cloud_kustomization["secretGenerator"] if g["name"] == "edgefleet-s3")["files"])
    assert {f.split("=", 1)[1] for f in device_files}.isdisjoint({f.split("=", 1)[1] for f in root_files})


def _break(docs: list[dict], kind: str, name: str, change) -> list[dict]:
    broken = copy.deepcopy(docs)
    change(next(d for d in broken if d["kind"] == kind and d["metadata"]["name"] == name))
    return broken


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _container(doc: dict, name: str, init: bool = False) -> dict:
    return next(c for c in _pod_spec(doc)["initContainers" if init else "containers"] if c["name"] == name)


def _volume(doc: dict, name: str) -> dict:
    return next(v for v in _pod_spec(doc)["volumes"] if v["name"] == name)


REGRESSIONS = {
    "no fsGroup on cloud_ingest: its 0440 TLS key is unreadable": (
        "cloud", "StatefulSet", "cloud-ingest", lambda d: _pod_spec(d)["securityContext"].pop("fsGroup"),
        "cloud-ingest (uid 10001, groups [10001]) cannot read /certs/cloud-ingest-0.key"),
    "cloud_ingest's TLS key back at 0400": (
        "cloud", "StatefulSet", "cloud-ingest", lambda d: _volume(d, "certs")["secret"].update(defaultMode=0o400),
        "cannot read /certs/cloud-ingest-0.key: mode 0400"),
    "a third cloud_ingest replica without its certificate": (
        "cloud", "StatefulSet", "cloud-ingest", lambda d: d["spec"].update(replicas=3),
        "/certs/cloud-ingest-2.crt is not in volume certs"),
    "edge sync without its S3 key pair": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _volume(d, "sync-secrets")["projected"]["sources"].pop(1),
        "reads S3 and has no S3 key pair"),
    "the broker's passwords back at 0400": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _volume(d, "broker-passwords")["secret"].update(defaultMode=0o400),
        "cannot read /mosquitto/config/passwords"),
    "no init step for the model store": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "volume-owners", init=True).update(
            command=["sh", "-c", "chown -R 1883:1883 /certs /bridge"]),
        "writes hostPath /var/lib/edgefleet/store"),
    "the seed model's own folder mounted as /models (the old manifest)": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _volume(d, "seed-model")["hostPath"].update(path="/var/lib/edgefleet/models/efficientnet-lite0"),
        "is /var/lib/edgefleet/models/efficientnet-lite0/efficientnet-lite0 on the node"),
    "sync's seed model on no volume": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: next(m for m in _container(d, "sync")["volumeMounts"] if m["name"] == "seed-model").update(
            mountPath="/seed"),
        "seed_model_dir = /models/efficientnet-lite0, which is on no volume"),
    "MinIO's root keys not mounted": (
        "cloud", "Deployment", "minio", lambda d: _container(d, "minio")["volumeMounts"].pop(),
        "MINIO_ROOT_USER_FILE=/run/secrets/minio/access-key, which is on no volume"),
    "the operator's key unreadable": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _volume(d, "operator-keys")["secret"].update(defaultMode=0o400),
        "cannot read /run/secrets/edgefleet-keys/operator.pub"),
    "telemetry's /tmp dropped under a read-only root": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "telemetry")["volumeMounts"].pop(),
        "writes /tmp, which is on no volume (the root filesystem is read-only)"),
    "one /tmp shared by two services": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "inference")["volumeMounts"][-1].update(name="sync-tmp"),
        "/tmp is shared with ['sync']"),
    "a privileged broker": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "broker")["securityContext"].update(allowPrivilegeEscalation=True),
        "broker: allowPrivilegeEscalation is not false"),
    "a writable root filesystem": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "inference").update(securityContext={"allowPrivilegeEscalation": False,
                                                                    "capabilities": {"drop": ["ALL"]}}),
        "inference: the root filesystem is writable"),
    "the cameras' listener not on the node's network": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "broker")["ports"][1].pop("hostPort"),
        "TLS listener 8884 is not on the node's port 8884"),
    "a typo'd setting": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "sync")["env"].append({"name": "EDGEFLEET_MODEL_STOR", "value": "/x"}),
        "EDGEFLEET_MODEL_STOR is no setting of SyncSettings"),
    "a probe reading another file": (
        "edge", "DaemonSet", "edgefleet-edge",
        lambda d: _container(d, "telemetry").update(
            livenessProbe={"exec": {"command": ["python", "-m", "shared.health", "/tmp/x"]}}),
        "its livenessProbe reads ['/tmp/x']"),
    "inference's metrics port not declared": (
        "edge", "DaemonSet", "edgefleet-edge", lambda d: _container(d, "inference").pop("ports"),
        "inference: Prometheus does not scrape its metrics port 9101"),
    "the console's pod not annotated for scraping": (
        "cloud", "Deployment", "console", lambda d: d["spec"]["template"]["metadata"].pop("annotations"),
        "console: Prometheus does not scrape its metrics port 9105"),
    "cloud_ingest's metrics port apart from its setting": (
        "cloud", "StatefulSet", "cloud-ingest",
        lambda d: _container(d, "cloud-ingest")["ports"][0].update(containerPort=9999),
        "cloud-ingest: Prometheus scrapes port 9999 (/metrics), no metrics port"),
}


@pytest.mark.parametrize("regression", REGRESSIONS)
def test_each_check_catches_its_regression(rendered, regression, tmp_path):
    overlay, kind, name, change, expected = REGRESSIONS[regression]
    assert all_problems(rendered[overlay], tmp_path) == []
    problems = all_problems(_break(rendered[overlay], kind, name, change), tmp_path)
    assert any(expected in p for p in problems), problems
