#!/usr/bin/env bash
# Builds the pinned local-control-plane binaries from published Go modules and caches them by version.
# Usage: tools/build.sh [kubernetes|etcd|kwok|helm|kind|containerd|nodetools ...]   (default: all)
# Prints the cache directory of each component. A component whose binaries exist is skipped.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
cache_root=${GPUAAS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gpuaas}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Runs `go build -v`/`go install -v` and reports how many packages compiled so far, every 20 s.
go_with_progress() {
  local label=$1; shift
  local count_file; count_file=$(mktemp)
  local start=$SECONDS
  ( "$@" 2>&1 | while IFS= read -r line; do
      case "$line" in
        "go: downloading "*|"go: finding "*|"go: extracting "*) ;;  # module fetches: progress, not news
        *:*) echo "$line" >&2 ;;  # errors and warnings carry a colon; package paths do not
        *) echo x >>"$count_file" ;;
      esac
    done; exit "${PIPESTATUS[0]}" ) &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    kill -0 "$pid" 2>/dev/null && log "$label: $(wc -l <"$count_file") packages compiled, $((SECONDS - start)) s"
  done
  local rc=0; wait "$pid" || rc=$?
  rm -f "$count_file"
  [ "$rc" -eq 0 ] || { log "$label: build failed (exit $rc)"; return "$rc"; }
  log "$label: done in $((SECONDS - start)) s"
}

# done_or_build NAME VERSION BINARY... : returns 0 (skip) when every binary is cached.
is_cached() {
  local dir=$1; shift
  local bin
  for bin in "$@"; do [ -x "$dir/$bin" ] || return 1; done
}

build_kubernetes() {
  local dir="$cache_root/kubernetes/$KUBERNETES_VERSION"
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
  if ! is_cached "$dir" "${bins[@]}"; then
    local pinned; pinned=$(cd "$here/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
    [ "$pinned" = "$KUBERNETES_VERSION" ] ||
      { log "tools/kubernetes/go.mod pins $pinned, not $KUBERNETES_VERSION: run tools/gen-kubernetes-mod.sh"; return 1; }
    local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
    local ldflags="-s -w"
    local pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    log "kubernetes $KUBERNETES_VERSION: building ${bins[*]} (a cold build takes tens of minutes)"
    mkdir -p "$dir.tmp"
    (cd "$here/kubernetes" && go_with_progress "kubernetes $KUBERNETES_VERSION" \
      go build -v -trimpath -tags selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$dir.tmp/" \
      "${bins[@]/#/k8s.io/kubernetes/cmd/}")
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

build_etcd() {
  local dir="$cache_root/etcd/$ETCD_VERSION"
  if ! is_cached "$dir" etcd; then
    log "etcd $ETCD_VERSION: building"
    mkdir -p "$dir.tmp"
    (cd "$here/etcd" && go_with_progress "etcd $ETCD_VERSION" \
      go build -v -trimpath -ldflags "-s -w" -o "$dir.tmp/etcd" .)
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# go_install_pinned NAME VERSION LDFLAGS PACKAGE...
go_install_pinned() {
  local name=$1 version=$2 ldflags=$3; shift 3
  local dir="$cache_root/$name/$version"
  local bins=() pkg
  for pkg in "$@"; do bins+=("$(basename "${pkg%@*}")"); done
  if ! is_cached "$dir" "${bins[@]}"; then
    log "$name $version: building ${bins[*]}"
    mkdir -p "$dir.tmp"
    (cd "$here" && GOBIN="$dir.tmp" go_with_progress "$name $version" \
      go install -v -trimpath -ldflags "$ldflags" "$@")
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

build_kwok() {
  go_install_pinned kwok "$KWOK_VERSION" \
    "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$KUBERNETES_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

build_helm() {
  go_install_pinned helm "$HELM_VERSION" "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
}

# containerd, its runc shim and ctr, from the wrapper module tools/containerd (runc and CNI plugins come from Debian).
build_containerd() {
  local dir="$cache_root/containerd/$CONTAINERD_VERSION"
  local bins=(containerd containerd-shim-runc-v2 ctr)
  if ! is_cached "$dir" "${bins[@]}"; then
    local pinned; pinned=$(cd "$here/containerd" && go list -m -f '{{.Version}}' github.com/containerd/containerd/v2)
    [ "$pinned" = "$CONTAINERD_VERSION" ] ||
      { log "tools/containerd/go.mod pins $pinned, not $CONTAINERD_VERSION"; return 1; }
    log "containerd $CONTAINERD_VERSION: building ${bins[*]}"
    mkdir -p "$dir.tmp"
    (cd "$here/containerd" && go_with_progress "containerd $CONTAINERD_VERSION" \
      go build -v -trimpath -tags no_btrfs,no_devmapper,no_zfs \
      -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" -o "$dir.tmp/" \
      "${bins[@]/#/github.com/containerd/containerd/v2/cmd/}")
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

# gpuaas's own node programs (tools/nodetools): the pause image's binary and the fake NVIDIA device plugin.
# Keyed by a hash of their sources, so an edit rebuilds them.
build_nodetools() {
  local key; key=$(cd "$here/nodetools" && find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) -print0 |
    sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
  local dir="$cache_root/nodetools/$key"
  local bins=(pause fake-device-plugin)
  if ! is_cached "$dir" "${bins[@]}"; then
    log "nodetools $key: building ${bins[*]}"
    mkdir -p "$dir.tmp"
    (cd "$here/nodetools" && go_with_progress "nodetools" \
      go build -v -trimpath -ldflags "-s -w" -o "$dir.tmp/" ./cmd/pause ./cmd/fake-device-plugin)
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir"
}

build_kind() {
  go_install_pinned kind "$KIND_VERSION" "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
}

components=("$@")
[ "${#components[@]}" -gt 0 ] || components=(kubernetes etcd kwok helm kind containerd nodetools)
for component in "${components[@]}"; do
  case "$component" in
    kubernetes|etcd|kwok|helm|kind|containerd|nodetools) "build_$component" ;;
    *) log "unknown component: $component"; exit 2 ;;
  esac
done
