#!/usr/bin/env bash
# Copies the CRDs (crds/*.yaml, the source of truth; not crds/samples/) into the Helm chart.
# Helm can only read files inside the chart, so helm/gpuaas/files/crds/ is a committed copy that
# templates/crds.yaml renders. tests/unit/test_chart_crds.py fails when the copy drifts: run this
# script after every CRD change and commit both.
# Usage: tools/sync-chart-crds.sh [--check]   (--check: exit 1 if the copy differs, change nothing)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src="$root/crds"
dst="$root/helm/gpuaas/files/crds"

if [ "${1:-}" = "--check" ]; then
  if diff -r -q --exclude=samples "$src" "$dst"; then
    echo "helm/gpuaas/files/crds is in sync with crds/"
    exit 0
  fi
  echo "helm/gpuaas/files/crds differs from crds/: run tools/sync-chart-crds.sh" >&2
  exit 1
fi

mkdir -p "$dst"
# Remove copies of CRDs that no longer exist in crds/.
for copy in "$dst"/*.yaml; do
  [ -e "$copy" ] || continue
  [ -e "$src/$(basename "$copy")" ] || rm -f "$copy"
done
for crd in "$src"/*.yaml; do
  cp "$crd" "$dst/$(basename "$crd")"
done
echo "copied $(find "$src" -maxdepth 1 -name '*.yaml' | wc -l) CRDs into ${dst#"$root"/}"
