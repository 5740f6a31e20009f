#!/usr/bin/env bash
# Builds the pinned local-control-plane binaries from published Go modules and caches them by version.
# Usage: tools/build.sh [kubernetes|etcd|kwok|helm|kind ...]   (default: all)
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
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
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

build_kind() {
  go_install_pinned kind "$KIND_VERSION" "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
}

components=("$@")
[ "${#components[@]}" -gt 0 ] || components=(kubernetes etcd kwok helm kind)
for component in "${components[@]}"; do
  case "$component" in
    kubernetes|etcd|kwok|helm|kind) "build_$component" ;;
    *) log "unknown component: $component"; exit 2 ;;
  esac
done
