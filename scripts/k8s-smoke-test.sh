#!/usr/bin/env bash
# Smoke test of a gpuhub deployment on a real Kubernetes cluster (docs/kubernetes.md, step 5).
#
#   scripts/k8s-smoke-test.sh -n jhub -u https://hub.example.org -t TOKEN -g a100 [-s smoke-user]
#
#   -n  namespace of the Zero to JupyterHub release            (default: jhub)
#   -u  the hub's public URL                                   (required)
#   -t  a JupyterHub API token with admin:users, servers, admin:server_state and
#       access:servers (an admin's token)                      (or $JUPYTERHUB_API_TOKEN)
#   -g  the catalogue's GPU type to test                       (default: the catalogue's default)
#   -s  the user the test server belongs to (created if needed) (default: gpuhub-smoke)
#
# Needs kubectl (with access to the namespace), curl and python3. Exits non-zero at the first
# failed check; the test server is stopped at the end either way. The user's home PVC is kept.
set -euo pipefail

namespace=jhub hub_url="" token="${JUPYTERHUB_API_TOKEN:-}" gpu_type="" user=gpuhub-smoke
while getopts "n:u:t:g:s:h" opt; do
  case $opt in
    n) namespace=$OPTARG ;;
    u) hub_url=${OPTARG%/} ;;
    t) token=$OPTARG ;;
    g) gpu_type=$OPTARG ;;
    s) user=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
[[ -n $hub_url && -n $token ]] || { sed -n '2,16p' "$0"; exit 2; }

api="$hub_url/hub/api"
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
hub() {  # hub METHOD PATH [JSON]
  curl -fsS -X "$1" -H "Authorization: token $token" -H "Content-Type: application/json" \
    ${3:+--data "$3"} "$api$2"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
server_field() { hub GET "/users/$user" | json "(d['servers'].get('') or {}).get('$1')"; }
wait_ready() {
  for _ in $(seq 1 120); do
    [[ $(server_field ready) == True ]] && return 0
    [[ $(server_field pending) == None && $(server_field ready) != True ]] && fail "the server is not starting"
    sleep 5
  done
  fail "the server did not become ready in 10 minutes"
}
stop_server() {
  hub DELETE "/users/$user/server" >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    [[ $(server_field ready) == None && $(server_field pending) == None ]] && return 0
    sleep 2
  done
}
trap stop_server EXIT

step "GPU resources the nodes offer"
kubectl get nodes -o json | python3 -c '
import json, sys
for n in json.load(sys.stdin)["items"]:
    gpus = {k: v for k, v in n["status"]["allocatable"].items() if k.startswith("nvidia.com/")}
    product = n["metadata"]["labels"].get("nvidia.com/gpu.product", "-")
    print(f"{n[\"metadata\"][\"name\"]:<40} {product:<30} {gpus}")'

step "the hub answers and runs gpuhub"
hub GET / | json "'JupyterHub ' + d['version']"
kubectl -n "$namespace" exec deploy/hub -- python3 -c "import gpuhub.spawner.kube" \
  || fail "gpuhub is not installed in the hub image"

step "start $user's server with one ${gpu_type:-default} GPU"
hub POST "/users/$user" >/dev/null 2>&1 || true
options="{\"gpus\": 1${gpu_type:+, \"gpu_type\": \"$gpu_type\"}}"
hub POST "/users/$user/server" "{\"user_options\": $options}" >/dev/null
wait_ready
pod=$(kubectl -n "$namespace" get pods -l "gpuhub.io/user=$user,gpuhub.io/server=default" \
  -o jsonpath='{.items[0].metadata.name}')
[[ -n $pod ]] || fail "no pod labelled gpuhub.io/user=$user"
echo "pod $pod on $(kubectl -n "$namespace" get pod "$pod" -o jsonpath='{.spec.nodeName}')"

step "the pod asks for exactly one GPU and sees one"
kubectl -n "$namespace" get pod "$pod" -o json | python3 -c '
import json, sys
pod = json.load(sys.stdin)
limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
gpus = {k: v for k, v in limits.items() if k.startswith("nvidia.com/")}
labels = pod["metadata"]["labels"]
print("GPU limits:", gpus, "labels:", {k: v for k, v in labels.items() if k.startswith("gpuhub.io/")})
assert list(gpus.values()) == ["1"], gpus
assert labels["gpuhub.io/gpus"] == "1"'
visible=$(kubectl -n "$namespace" exec "$pod" -- nvidia-smi -L | tee /dev/stderr | grep -c '^\s*\(GPU\|MIG\)' || true)
[[ $visible -ge 1 ]] || fail "nvidia-smi sees no GPU in the pod"

step "the home survives a restart without GPU"
marker="smoke-$(date +%s)"
kubectl -n "$namespace" exec "$pod" -- sh -c "echo $marker > \$HOME/.gpuhub-smoke-test"
stop_server
hub POST "/users/$user/server" '{"user_options": {"gpus": 0}}' >/dev/null
wait_ready
pod=$(kubectl -n "$namespace" get pods -l "gpuhub.io/user=$user,gpuhub.io/server=default" \
  -o jsonpath='{.items[0].metadata.name}')
[[ $(kubectl -n "$namespace" exec "$pod" -- cat /home/jovyan/.gpuhub-smoke-test) == "$marker" ]] \
  || fail "the file written before the restart is gone"
limits=$(kubectl -n "$namespace" get pod "$pod" -o jsonpath='{.spec.containers[0].resources.limits}')
[[ $limits != *nvidia.com/* ]] || fail "a CPU-only server got GPU limits: $limits"
echo "home kept; CPU-only pod has no GPU limits"

step "stop"
stop_server
echo "all checks passed"
