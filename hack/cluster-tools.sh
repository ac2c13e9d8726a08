#!/usr/bin/env bash
# Builds the Kubernetes test-cluster tools from their Go modules at the releases
# pinned in hack/k8s/versions.env: etcd, kube-apiserver, kube-controller-manager,
# kubectl and helm. The binaries are cached outside the checkout (CI clones
# afresh) in $KUBETUNE_CACHE/k8s-<version>/ (default ~/.cache/kubetune), keyed by
# the pinned go.mod/go.sum and build flags, so a warm machine builds nothing.
# Prints the directory holding the binaries on stdout; progress goes to stderr.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
module_dir="$root/hack/k8s"
source "$module_dir/versions.env"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
dest="$cache/k8s-$KUBERNETES_VERSION"
tools=(etcd kube-apiserver kube-controller-manager kubectl helm)

log() { echo "hack/cluster-tools.sh: $*" >&2; }

# Version stamps, as the upstream release builds set them: the API server's
# /version, kubectl's client version and helm's idea of the cluster version
# (which chart kubeVersion constraints are checked against) depend on them.
# Helm is built against client-go v0.<kube_minor>, which its Makefile reads as 1.<kube_minor>.
kube_minor="${KUBERNETES_VERSION#v1.}"; kube_minor="${kube_minor%%.*}"
kube_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    kube_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1"
    kube_ldflags+=" -X $pkg.gitMinor=$kube_minor -X $pkg.gitTreeState=clean"
done
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kube_minor"
done

key="$(cat "$module_dir/go.mod" "$module_dir/go.sum" "$module_dir/versions.env" <(
    echo "$kube_ldflags|$helm_ldflags|cgo=0|trimpath") | sha256sum | cut -c1-16)"

# The test cluster's certificates are made with openssl.
if ! command -v openssl >/dev/null 2>&1; then
    log "installing openssl"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
fi

all_present() { for t in "${tools[@]}"; do [ -x "$dest/$t" ] || return 1; done; }
if all_present && [ "$(cat "$dest/.build-key" 2>/dev/null)" = "$key" ]; then
    log "cached in $dest (Kubernetes $KUBERNETES_VERSION, etcd $ETCD_VERSION, Helm $HELM_VERSION); nothing to build"
    echo "$dest"
    exit 0
fi

export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { log "Go is not installed (expected /usr/local/go/bin/go)"; exit 1; }
# Never fetch another toolchain; build static binaries without a C compiler.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false -p=${KUBETUNE_BUILD_JOBS:-$(nproc)}"
log "building into $dest with $(go version | cut -d' ' -f3), GOFLAGS=$GOFLAGS"
mkdir -p "$cache"
work="$(mktemp -d "$cache/.k8s-build.XXXXXX")"
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
cd "$module_dir"

seconds() { date +%s; }
elapsed() { local s=$(( $(seconds) - $1 )); printf '%dm%02ds' $((s / 60)) $((s % 60)); }
total_start="$(seconds)"

packages=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
          k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3 helm.sh/helm/v3/cmd/helm)
step_start="$(seconds)"
log "downloading the Go modules the tools need"
# Listing the packages fetches only the modules they use (go mod download would
# also fetch every test-only dependency in the graph: several hundred MB more).
downloads="$(mktemp)"
go list -deps "${packages[@]}" >/dev/null 2>"$downloads" || { cat "$downloads" >&2; exit 1; }
log "modules ready: $(grep -c '^go: downloading' "$downloads" || true) downloaded ($(elapsed "$step_start"))"
rm -f "$downloads"

# One `go build` for the Kubernetes commands shares their common packages.
step_start="$(seconds)"
log "building kube-apiserver, kube-controller-manager, kubectl $KUBERNETES_VERSION"
go build -trimpath -ldflags="$kube_ldflags" -o "$work/" "${packages[@]:0:3}"
log "built Kubernetes commands ($(elapsed "$step_start"))"

step_start="$(seconds)"
log "building etcd $ETCD_VERSION"
go build -trimpath -ldflags="-s -w" -o "$work/etcd" "${packages[3]}"
log "built etcd ($(elapsed "$step_start"))"

step_start="$(seconds)"
log "building helm $HELM_VERSION"
go build -trimpath -ldflags="$helm_ldflags" -o "$work/helm" "${packages[4]}"
log "built helm ($(elapsed "$step_start"))"

echo "$key" > "$work/.build-key"
# Swap the finished directory in whole, so an interrupted build never looks cached.
rm -rf "$dest.old"
[ -d "$dest" ] && mv "$dest" "$dest.old"
mv "$work" "$dest"
rm -rf "$dest.old"
trap - EXIT
log "done in $(elapsed "$total_start"): $(cd "$dest" && du -ch "${tools[@]}" | tail -1 | cut -f1) in $dest"
echo "$dest"
