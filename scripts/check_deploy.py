"""Checks what schema validation cannot: that deploy/ agrees with itself
and with the code. Called by scripts/check-deploy.sh after the schema checks
(docker-compose config, kubernetes-validate).

    check_deploy.py <warren-api binary> <compose config as YAML>

- The environment every container gets (ConfigMap + Secret + its own env in
  Kubernetes; the resolved environment in Compose) loads as valid Warren
  settings: `warren-api definitions` exits 0 with exactly that environment,
  so a misspelt key or a bad value fails here, not at 3 a.m.
- Kubernetes and Compose give a stopping worker longer than its shutdown
  grace period, so running tasks finish instead of being killed.
- The Dockerfile's dependency layer knows every workspace member.
- Probes and scrape annotations point at the ports the processes listen on.
- Autoscalers target the worker Deployment, and KEDA watches the queue the
  workers consume, with credentials that exist in the Secret.
"""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise SystemExit(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def settings_load(api_bin, env, what):
    """Runs `warren-api definitions` with exactly `env`: it loads and
    validates the settings and prints the broker topology."""
    clean = {"PATH": os.environ.get("PATH", ""), "WARREN_CONFIG_DIR": str(ROOT / "config")}
    clean.update(env)
    run = subprocess.run([api_bin, "definitions"], env=clean, capture_output=True, text=True)
    check(run.returncode == 0, f"{what}: settings do not load:\n{run.stderr.strip()}")
    return yaml.safe_load(run.stdout) if run.returncode == 0 else None


def seconds(value):
    """Compose durations (`40s`, `1m30s`) and plain numbers, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total, number = 0.0, ""
    for ch in str(value):
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"s": 1, "m": 60, "h": 3600}[ch]
            number = ""
    return total + (float(number) if number else 0.0)


def default_setting(section, key):
    import tomllib

    with open(ROOT / "config" / "default.toml", "rb") as f:
        return tomllib.load(f)[section][key]


def container_env(container, configmap, secret):
    env = dict(configmap["data"])
    env.update(secret["stringData"])
    for e in container.get("env", []):
        env[e["name"]] = e["value"]
    return env


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def check_kubernetes(api_bin):
    docs = []
    for name in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]:
        docs += load_all(K8S / name)
    alternatives = load_all(K8S / "alternatives" / "hpa-cpu.yaml")
    configmap = by_kind(docs, "ConfigMap")
    secret = by_kind(docs, "Secret")
    api = by_kind(docs, "Deployment", "warren-api")
    worker = by_kind(docs, "Deployment", "warren-worker")
    migrate = by_kind(docs, "Job")

    definitions = None
    for deployment in (api, worker, migrate):
        spec = deployment["spec"]["template"]["spec"]
        for c in spec["containers"]:
            loaded = settings_load(api_bin, container_env(c, configmap, secret), f"k8s {deployment['metadata']['name']}/{c['name']}")
            definitions = definitions or loaded

    # Stopping workers: Kubernetes must wait longer than the worker drains.
    grace = float(configmap["data"].get("WARREN_WORKER__SHUTDOWN_GRACE_SECONDS", default_setting("worker", "shutdown_grace_seconds")))
    pod = worker["spec"]["template"]["spec"]
    check(pod["terminationGracePeriodSeconds"] > grace,
          f"k8s worker terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} must exceed shutdown grace {grace}")

    # Probes and scrape annotations on the ports the processes listen on.
    for deployment, listen_key in ((api, "WARREN_API__LISTEN"), (worker, "WARREN_WORKER__METRICS_LISTEN")):
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        port = port_of(container_env(c, configmap, secret)[listen_key])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        name = deployment["metadata"]["name"]
        for probe in ("readinessProbe", "livenessProbe"):
            target = c[probe]["httpGet"]["port"]
            check(ports.get(target, target) == port, f"k8s {name} {probe} port {target} is not the listen port {port}")
        annotation = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
        check(int(annotation) == port, f"k8s {name} prometheus.io/port {annotation} is not {port}")
        check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"k8s {name} readiness is /readyz")
        check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"k8s {name} liveness is /healthz")

    # Service selects the API pods; PDBs select existing pods.
    service = by_kind(docs, "Service", "warren-api")
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    check(service["spec"]["selector"].items() <= api_labels.items(), "k8s Service selects the API pods")
    pods = [api_labels, worker["spec"]["template"]["metadata"]["labels"]]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        check(any(selector <= p.items() for p in pods), f"k8s PDB {pdb['metadata']['name']} selects no pods")

    # Autoscaling: KEDA on the queue the workers consume, or HPA on CPU.
    scaled = by_kind(docs, "ScaledObject")
    check(scaled["spec"]["scaleTargetRef"]["name"] == "warren-worker", "KEDA scales the worker Deployment")
    hpa = by_kind(alternatives, "HorizontalPodAutoscaler")
    check(hpa["spec"]["scaleTargetRef"]["name"] == "warren-worker", "the HPA scales the worker Deployment")
    queues = {q["name"] for q in (definitions or {}).get("queues", [])}
    auth = by_kind(docs, "TriggerAuthentication")
    for trigger in scaled["spec"]["triggers"]:
        queue = trigger["metadata"]["queueName"]
        check(queue in queues, f"KEDA watches queue {queue}, which Warren does not declare ({sorted(queues)})")
        check(trigger["authenticationRef"]["name"] == auth["metadata"]["name"], "KEDA trigger uses the TriggerAuthentication")
    for ref in auth["spec"]["secretTargetRef"]:
        check(ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"],
              f"KEDA secret reference {ref} exists in the Secret")


def check_compose(api_bin, compose_path):
    compose = yaml.safe_load(Path(compose_path).read_text())
    services = compose["services"]
    for name in ("migrate", "api", "worker"):
        settings_load(api_bin, {k: str(v) for k, v in services[name]["environment"].items()}, f"compose {name}")
    worker = services["worker"]
    grace = float(worker["environment"].get("WARREN_WORKER__SHUTDOWN_GRACE_SECONDS", default_setting("worker", "shutdown_grace_seconds")))
    check(seconds(worker["stop_grace_period"]) > grace,
          f"compose worker stop_grace_period {worker['stop_grace_period']} must exceed shutdown grace {grace}")
    check(worker.get("deploy", {}).get("replicas", 1) >= 2, "compose runs several worker replicas")
    check("ports" not in worker, "compose workers publish no host port (they could not scale)")
    check(worker["healthcheck"]["test"][1:] == ["warren-worker", "healthcheck"], "compose worker health is the worker's own")
    check(services["migrate"]["command"] == ["warren-api", "migrate"], "compose migrate service migrates")
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        check(deps.get("migrate", {}).get("condition") == "service_completed_successfully",
              f"compose {name} starts after migrations")


def check_dockerfile():
    """The dependency layer is built from every workspace member's manifest
    (cargo needs them all to resolve the workspace); a new crate must be
    copied there too."""
    import tomllib

    with open(ROOT / "Cargo.toml", "rb") as f:
        members = tomllib.load(f)["workspace"]["members"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for member in members:
        check(f"COPY {member}/Cargo.toml {member}/" in dockerfile,
              f"deploy/Dockerfile copies {member}/Cargo.toml into the dependency layer")
        check(f"{member}/src" in dockerfile or member == "tests",
              f"deploy/Dockerfile stubs {member}/src in the dependency layer")
    for binary in ("warren-api", "warren-worker"):
        check(f"-p {binary}" in dockerfile and f"/release/{binary}" in dockerfile,
              f"deploy/Dockerfile builds and ships {binary}")
    check("USER 10001" in dockerfile, "the image runs as a non-root user")


def main():
    api_bin, compose_config = sys.argv[1], sys.argv[2]
    check_dockerfile()
    check_kubernetes(api_bin)
    check_compose(api_bin, compose_config)
    if failures:
        print("deploy/ checks failed:", *failures, sep="\n  - ", file=sys.stderr)
        sys.exit(1)
    print("deploy/ is consistent: Dockerfile, settings load, grace periods, probes, autoscaling")


if __name__ == "__main__":
    main()
