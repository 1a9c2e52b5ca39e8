#!/usr/bin/env bash
# Validates deploy/ without a Docker engine or a cluster: the Compose file
# with Debian's docker-compose (schema, interpolation), the Kubernetes
# manifests with kubernetes-validate (schemas of the Kubernetes release,
# strict: unknown fields fail), then scripts/check_deploy.py for what no
# schema knows (settings load, grace periods, probes, autoscaling targets).
# Called by scripts/test.sh; needs the debug build of warren-api.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$WARREN_ROOT"

command -v docker-compose >/dev/null || apt_install docker-compose
ensure_python_tools
api=$CARGO_TARGET_DIR/debug/warren-api
[ -x "$api" ] || die "build first: cargo build --bins"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
say "docker-compose config: deploy/compose.yaml"
docker-compose -f deploy/compose.yaml config >"$out/compose.yaml"

say "kubernetes-validate --strict: deploy/k8s"
# KEDA's kinds are custom resources kubernetes-validate has no schema for
# (it warns); check_deploy.py checks what they refer to.
mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
status=0
report=$("$PY_VENV/bin/kubernetes-validate" --strict --quiet "${manifests[@]}" 2>&1) || status=$?
grep -v "Couldn't find schema for kind \(TriggerAuthentication\|ScaledObject\) with api version keda.sh/" <<<"$report" || true
[ "$status" -eq 0 ] || die "kubernetes-validate rejected deploy/k8s (output above)"

say "deploy/ consistency"
"$PY_VENV/bin/python" scripts/check_deploy.py "$api" "$out/compose.yaml"
