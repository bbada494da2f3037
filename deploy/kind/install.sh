#!/usr/bin/env bash
# A kind cluster running the overlay instead of flanneld, in the spirit of the flannel
# ipip walkthrough: build the image, create the cluster without a CNI, give the nodes
# the bridge CNI plugin that kind's node image lacks, load the image, apply the
# manifest, wait for the rollout, then ping from a pod on one worker to a pod on the
# other. Needs docker (an engine), kind, kubectl, curl; rerunning reuses what exists.
#
#   deploy/kind/install.sh            # cluster "overlay-ipip"
#   CLUSTER=dev deploy/kind/install.sh
#   kind delete cluster --name overlay-ipip
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
CLUSTER="${CLUSTER:-overlay-ipip}"
# The image deploy/kube-flannel-overlay.yml names; kind load makes it present on every
# node, and imagePullPolicy IfNotPresent keeps kubelet from pulling it.
IMAGE="overlay-agent:0.1.0"
# kind's node image builds these same plugins (host-local, loopback, ptp, portmap)
# but not bridge, which the flannel CNI plugin delegates to.
CNI_PLUGINS_VERSION="${CNI_PLUGINS_VERSION:-v1.9.1}"
ctx=(--context "kind-$CLUSTER")

for tool in docker kind kubectl curl tar sha256sum; do
  command -v "$tool" >/dev/null || { echo "install.sh needs $tool" >&2; exit 1; }
done

date
echo "== 1. image $IMAGE"
docker build -f "$root/deploy/Dockerfile" -t "$IMAGE" "$root"

echo "== 2. cluster $CLUSTER (no CNI)"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config "$here/cluster.yaml"
fi

echo "== 3. bridge CNI plugin $CNI_PLUGINS_VERSION on every node"
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) echo "no CNI plugins release for $(uname -m)" >&2; exit 1 ;;
esac
cache="${XDG_CACHE_HOME:-$HOME/.cache}/overlay-kind"
tgz="cni-plugins-linux-$arch-$CNI_PLUGINS_VERSION.tgz"
mkdir -p "$cache"
if [ ! -x "$cache/$CNI_PLUGINS_VERSION/bridge" ]; then
  url="https://github.com/containernetworking/plugins/releases/download/$CNI_PLUGINS_VERSION/$tgz"
  curl -fsSL -o "$cache/$tgz" "$url"
  curl -fsSL -o "$cache/$tgz.sha256" "$url.sha256"
  (cd "$cache" && sha256sum -c "$tgz.sha256")
  mkdir -p "$cache/$CNI_PLUGINS_VERSION"
  tar -xzf "$cache/$tgz" -C "$cache/$CNI_PLUGINS_VERSION" ./bridge
fi
for node in $(kind get nodes --name "$CLUSTER"); do
  docker cp "$cache/$CNI_PLUGINS_VERSION/bridge" "$node:/opt/cni/bin/bridge"
done

echo "== 4. load $IMAGE into the nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "== 5. apply the manifest and wait for the rollout"
kubectl "${ctx[@]}" apply -f "$root/deploy/kube-flannel-overlay.yml"
kubectl "${ctx[@]}" -n kube-flannel rollout status ds/kube-flannel-ds --timeout=300s
kubectl "${ctx[@]}" wait --for=condition=Ready nodes --all --timeout=300s
kubectl "${ctx[@]}" -n kube-flannel get pods -o wide

echo "== 6. pod to pod across workers"
mapfile -t workers < <(kind get nodes --name "$CLUSTER" | grep -- '-worker' | sort)
kubectl "${ctx[@]}" delete pod overlay-ping-0 overlay-ping-1 --ignore-not-found --wait=true
for i in 0 1; do
  kubectl "${ctx[@]}" run "overlay-ping-$i" --image=busybox:1.36 --restart=Never \
    --overrides="{\"spec\":{\"nodeName\":\"${workers[$i]}\"}}" -- sleep 3600
done
kubectl "${ctx[@]}" wait --for=condition=Ready pod/overlay-ping-0 pod/overlay-ping-1 --timeout=180s
target="$(kubectl "${ctx[@]}" get pod overlay-ping-1 -o jsonpath='{.status.podIP}')"
kubectl "${ctx[@]}" exec overlay-ping-0 -- ping -c 3 "$target"
kubectl "${ctx[@]}" delete pod overlay-ping-0 overlay-ping-1 --wait=false
echo "overlay running on kind-$CLUSTER; counters: kubectl ${ctx[*]} -n kube-flannel exec ds/kube-flannel-ds -- /usr/local/bin/overlay-agent counters"
