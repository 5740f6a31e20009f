"""The `gpuaas` command: run the operator, manage the local cluster, produce reports."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import typer

from gpuaas.api.usage import DEFAULT_TIME_ZONE
from gpuaas.domain.ledger import month_bounds, month_of, parse_month
from gpuaas.domain.report import Report, build_merged_report, build_report, with_busy
from gpuaas.domain.scenarios import REAL_NODE_POOL, SCENARIOS, pool_manifest
from gpuaas.k8s.dcgm import BusyUnreadableError, read_busy
from gpuaas.k8s.kubeconfig import KubeconfigError, current_context
from gpuaas.k8s.ledger_reader import LedgerSource, LedgerUnreadableError, read_ledgers
from gpuaas.options import OperatorOptions
from gpuaas.reporting.formats import FORMATS, render

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(help="gpuaas: GPU-as-a-Service control plane for Kubernetes.", no_args_is_help=True)
cluster_app = typer.Typer(help="The local control plane: real Kubernetes binaries plus KWOK GPU nodes.")
app.add_typer(cluster_app, name="cluster")


class _Console:
    """rich's console on stderr for `gpuaas cluster`, loaded at its first message: `gpuaas report` prints plain lines
    and never loads rich, which was about a tenth of its start-up."""

    def __init__(self) -> None:
        self._console: Console | None = None

    def rich(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, soft_wrap=True)  # paths and commands stay on one line
        return self._console

    def print(self, text: str) -> None:
        self.rich().print(text)


console = _Console()

ClusterName = Annotated[str, typer.Option("--name", help="kwokctl cluster name.")]
KubeconfigOption = Annotated[
    Path | None, typer.Option("--kubeconfig", help="Where to write the kubeconfig (default .cluster/NAME.kubeconfig).")
]


@app.command()
def run(
    kubeconfig: Annotated[str | None, typer.Option(help="Kubeconfig; default in-cluster or $KUBECONFIG.")] = None,
    metrics_port: Annotated[int, typer.Option(help="Port of /metrics; 0 disables.")] = 8080,
    metrics_auth: Annotated[
        bool,
        typer.Option(help="Serve /metrics only to bearer tokens whose subject may get it (as the chart runs it)."),
    ] = False,
    health_port: Annotated[int, typer.Option(help="Port of /healthz (kopf liveness); 0 disables.")] = 8081,
    pool_resync_seconds: Annotated[float, typer.Option(help="How often pool status is re-derived.")] = 2.0,
    leader_lease: Annotated[
        str | None,
        typer.Option(help="Lease electing the one replica that reconciles (the others stand by, warm); unset: none."),
    ] = None,
    leader_lease_namespace: Annotated[
        str, typer.Option(help="Namespace of the Lease; default the pod's namespace ($POD_NAMESPACE), else default.")
    ] = "",
    leader_lease_seconds: Annotated[
        int, typer.Option(min=2, help="Seconds after the holder's last renewal before a standby takes over.")
    ] = 4,
    webhook_port: Annotated[int, typer.Option(help="Port of the admission webhooks; 0 disables them.")] = 9443,
    webhook_cert_dir: Annotated[
        str | None, typer.Option(help="Directory with tls.crt and tls.key (default .cluster/webhook).")
    ] = None,
    webhook_url: Annotated[
        str | None,
        typer.Option(help="Outside the cluster: the URL the API server calls; gpuaas then self-signs and registers."),
    ] = None,
    time_zone: Annotated[str, typer.Option(help="Time zone of the ledger's month boundaries.")] = "Asia/Seoul",
    ledger_flush_seconds: Annotated[
        float, typer.Option(help="Longest delay before a running allocation's usage is written to its GpuUsage.")
    ] = 60.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the operator until interrupted."""
    # Imported here: kopf and the handlers load only for `gpuaas run`, not for `report` or `cluster`.
    from gpuaas.handlers.runner import run_operator

    run_operator(
        OperatorOptions(
            kubeconfig=kubeconfig,
            metrics_port=metrics_port,
            metrics_auth=metrics_auth,
            health_port=health_port,
            pool_resync_seconds=pool_resync_seconds,
            leader_lease=leader_lease,
            leader_lease_namespace=leader_lease_namespace,
            leader_lease_seconds=leader_lease_seconds,
            verbose=verbose,
            webhook_port=webhook_port,
            webhook_cert_dir=webhook_cert_dir,
            webhook_url=webhook_url,
            time_zone=time_zone,
            ledger_flush_seconds=ledger_flush_seconds,
        )
    )


def crd_paths() -> list[Path]:
    from gpuaas.k8s import localcluster

    return sorted((localcluster.repo_root() / "crds").glob("*.yaml"))


@cluster_app.command("up")
def cluster_up(
    scenario: Annotated[str, typer.Option(help=f"Node scenario: {', '.join(SCENARIOS)}.")] = "program",
    name: ClusterName = "gpuaas",
    kubeconfig: KubeconfigOption = None,
    pools: Annotated[bool, typer.Option(help="Also apply the CRDs and the scenario's GpuPools.")] = True,
    real_nodes: Annotated[
        int,
        typer.Option(
            help="Real nodes (containerd + kubelet + kube-proxy on this host, root only): 0 or 1. The real node is "
            f"the system node and the only node of pool {REAL_NODE_POOL.name}, with 8 fake GPUs."
        ),
    ] = 0,
) -> None:
    """Start the local cluster (building pinned binaries on first use) and create fake GPU nodes."""
    # Imported per command: `gpuaas report` starts faster without the local cluster's modules.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from gpuaas.k8s import localcluster

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if real_nodes not in (0, 1):
        raise typer.BadParameter(
            "one real node per host: the kubelet's device-plugin directory is fixed, and two kubelets on one host "
            "remove each other's pods",
            param_hint="--real-nodes",
        )
    chosen = SCENARIOS[scenario]
    kubeconfig = kubeconfig or localcluster.default_kubeconfig(name)
    started = time.monotonic()
    binaries = localcluster.ensure_binaries()
    if localcluster.cluster_exists(binaries, name) and kubeconfig.exists():
        console.print(f"cluster [bold]{name}[/] exists; reusing it")
    else:
        console.print(f"starting cluster [bold]{name}[/] (kwokctl --runtime binary)")
        localcluster.create_cluster(binaries, name, kubeconfig)
    version = localcluster.wait_for_apiserver(kubeconfig)
    console.print(f"kube-apiserver {version} is up after {time.monotonic() - started:.1f}s")
    with Progress(
        TextColumn("creating nodes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console.rich()
    ) as progress:
        task = progress.add_task("nodes", total=chosen.node_count)
        created = localcluster.create_nodes(kubeconfig, chosen, lambda n: progress.advance(task, n))
    console.print(f"{created} nodes created, {chosen.node_count - created} already present")
    if pools:
        from gpuaas.k8s.client import new_api_client
        from gpuaas.k8s.manifests import load_manifests, server_side_apply

        with new_api_client(str(kubeconfig)) as api:
            for manifest in load_manifests(crd_paths()):
                server_side_apply(api, manifest)
            localcluster.wait_for_crds(api, [m["metadata"]["name"] for m in load_manifests(crd_paths())])
            for pool in chosen.pools:
                server_side_apply(api, pool_manifest(pool))
    if real_nodes:
        node = localcluster.start_local_real_node(
            binaries, name, kubeconfig, on_progress=lambda line: console.print(f"real node: {line}")
        )
        console.print(
            f"real node [bold]{node.state.node}[/] Ready (pool {REAL_NODE_POOL.name}); logs in {node.state.work}"
        )
        console.print(f"operator image {node.operator_image} imported (helm: --set image.pullPolicy=Never)")
        if pools:
            from gpuaas.k8s.client import new_api_client
            from gpuaas.k8s.manifests import server_side_apply

            with new_api_client(str(kubeconfig)) as api:
                server_side_apply(api, pool_manifest(REAL_NODE_POOL))
    totals = ", ".join(f"{model} x {gpus:,}" for model, gpus in chosen.gpus_by_model().items())
    console.print(f"scenario [bold]{chosen.name}[/]: {chosen.node_count:,} nodes, {totals}")
    console.print(f"ready in {time.monotonic() - started:.1f}s")
    typer.echo(f"export KUBECONFIG={kubeconfig}")
    typer.echo(f"export PATH={binaries.kubectl.parent}:$PATH  # kubectl matching the server")


@cluster_app.command("down")
def cluster_down(name: ClusterName = "gpuaas", kubeconfig: KubeconfigOption = None) -> None:
    """Stop the local cluster and delete its state; a real node is stopped first and the host restored."""
    from gpuaas.k8s import localcluster

    binaries = localcluster.ensure_binaries()
    kubeconfig = kubeconfig or localcluster.default_kubeconfig(name)
    if localcluster.stop_local_real_node(name, kubeconfig):
        console.print("real node stopped; host restored")
    localcluster.delete_cluster(binaries, name, kubeconfig)
    console.print(f"cluster {name} deleted")


@cluster_app.command("status")
def cluster_status(name: ClusterName = "gpuaas", kubeconfig: KubeconfigOption = None) -> None:
    """Say whether the local cluster runs, and how many nodes it has."""
    from gpuaas.k8s import localcluster

    kubeconfig = kubeconfig or localcluster.default_kubeconfig(name)
    binaries = localcluster.ensure_binaries()
    if not localcluster.cluster_exists(binaries, name) or not kubeconfig.exists():
        typer.echo(f"cluster {name}: not created")
        raise typer.Exit(1)
    try:
        version = localcluster.wait_for_apiserver(kubeconfig, timeout=5)
    except TimeoutError as error:
        typer.echo(f"cluster {name}: created but not answering ({error})")
        raise typer.Exit(1) from error
    summary = localcluster.node_summary(kubeconfig)
    typer.echo(f"cluster {name}: running, kube-apiserver {version}, kubeconfig {kubeconfig}")
    typer.echo(f"nodes: {summary.nodes} ({summary.ready} Ready), GPUs allocatable: {summary.gpus:,}")


@app.command()
def pools(
    kubeconfig: Annotated[str | None, typer.Option(help="Kubeconfig; default $KUBECONFIG.")] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for every pool's status to be current and all its nodes healthy.")
    ] = 0,
) -> None:
    """Print GPU totals by model from the pools' status."""
    from gpuaas.k8s.client import new_api_client
    from gpuaas.k8s.resources import list_pools, wait_for_pool_status

    with new_api_client(kubeconfig) as api:
        try:
            items = wait_for_pool_status(api, timeout=wait) if wait else list_pools(api)
        except TimeoutError as error:
            typer.echo(f"gpuaas pools: {error}", err=True)
            raise typer.Exit(1) from None
    totals: dict[str, dict[str, int]] = {}
    for pool in items:
        status = pool.get("status") or {}
        model = totals.setdefault(pool["spec"]["gpuModel"], {"pools": 0, "nodes": 0, "capacity": 0, "program": 0})
        model["pools"] += 1
        model["nodes"] += status.get("nodes", 0)
        model["capacity"] += status.get("capacityGPUs", 0)
        model["program"] += status.get("programGPUs", 0)
    for model_name, row in sorted(totals.items()):
        typer.echo(
            f"{model_name}: {row['capacity']:,} GPUs healthy in {row['nodes']:,} nodes across {row['pools']} pools "
            f"({row['program']:,} grantable)"
        )


def now() -> datetime:
    """The clock of the CLI (the domain takes `now` as an argument and never reads a clock)."""
    return datetime.now(UTC)


def resolve_month(value: str, time_zone: str, instant: datetime) -> str:
    """`YYYY-MM` as given; `current` / `previous` as the month of `instant` (or the one before) in `time_zone`."""
    if value in ("current", "previous"):
        year, month = parse_month(month_of(instant, time_zone))
        if value == "previous":
            year, month = (year - 1, 12) if month == 1 else (year, month - 1)
        return f"{year:04d}-{month:02d}"
    try:
        parse_month(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a month; use YYYY-MM (e.g. 2026-10), 'current' or 'previous'", param_hint="--month"
        ) from None
    return value


def report_path(out: str, month: str, format_name: str) -> Path:
    """A directory (existing, or given with a trailing slash) gets `gpuaas-report-<month>.<ext>`; else `out`."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        path.mkdir(parents=True, exist_ok=True)
        return path / f"gpuaas-report-{month}.{format_name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def add_busy(report: Report, url: str, step: int, instant: datetime) -> Report:
    """The report with busy GPU-hours from Prometheus over the month (up to now, for the current month)."""
    zone = report.time_zone.split(", ")[0]
    start, end = month_bounds(report.month, zone)
    return with_busy(report, read_busy(url, start, min(end, instant), step))


def ledger_sources(kubeconfigs: list[str], contexts: list[str]) -> list[LedgerSource]:
    """Where the report reads: one cluster by default; several contexts of one kubeconfig, or several kubeconfigs
    each at its current context, for a merged report. Each cluster is named by its context."""
    if len(kubeconfigs) > 1 and contexts:
        raise typer.BadParameter(
            "give several --context with one --kubeconfig, or several --kubeconfig each at its current context",
            param_hint="--context",
        )
    if contexts:
        kubeconfig = kubeconfigs[0] if kubeconfigs else None
        sources = [LedgerSource(context, kubeconfig, context) for context in contexts]
    elif len(kubeconfigs) > 1:
        try:
            sources = [LedgerSource(current_context(path), path) for path in kubeconfigs]
        except (KubeconfigError, OSError) as error:
            raise typer.BadParameter(str(error), param_hint="--kubeconfig") from None
    else:
        return [LedgerSource("", kubeconfigs[0] if kubeconfigs else None)]
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise typer.BadParameter(
            f"several clusters are named {', '.join(repeated)}; each cluster of a merged report needs a context "
            "name of its own",
            param_hint="--context",
        )
    return sources


@app.command()
def report(
    month: Annotated[
        str, typer.Option(help="Month to report: YYYY-MM, 'current' or 'previous' (in --time-zone).")
    ] = "previous",
    format_name: Annotated[str, typer.Option("--format", help=f"Output format: {', '.join(FORMATS)}.")] = "csv",
    out: Annotated[
        str | None,
        typer.Option(help="File, or directory for gpuaas-report-<month>.<format>; default stdout."),
    ] = None,
    kubeconfig: Annotated[
        list[str] | None,
        typer.Option(
            help="Kubeconfig; default in-cluster or $KUBECONFIG. Repeat it to merge clusters, each at its current "
            "context."
        ),
    ] = None,
    context: Annotated[
        list[str] | None,
        typer.Option(help="Kubeconfig context to read. Repeat it to merge clusters into one report (one per context)."),
    ] = None,
    time_zone: Annotated[
        str, typer.Option("--time-zone", "--timezone", help="Time zone that resolves 'current' and 'previous'.")
    ] = DEFAULT_TIME_ZONE,
    prometheus: Annotated[
        str | None,
        typer.Option(
            help="Prometheus (or Thanos Query) URL holding dcgm-exporter's DCGM_FI_DEV_GPU_UTIL: adds busy GPU-hours "
            "beside the held ones. In a merged report, its `cluster` label must name each cluster."
        ),
    ] = None,
    busy_step: Annotated[
        int, typer.Option(min=1, help="Seconds between the utilisation samples that busy GPU-hours add up.")
    ] = 60,
) -> None:
    """Write the monthly usage report, computed from the GpuUsage ledger (deleted allocations included).

    With several clusters (one per provider), the report merges their ledgers: rows per cluster and allocation,
    totals per cluster, pool, GPU model and provider, and the program's total. A cluster that cannot be read fails
    the report; none is ever left out.
    """
    if format_name not in FORMATS:
        raise typer.BadParameter(
            f"unknown format {format_name!r}; choose one of {', '.join(FORMATS)}", param_hint="--format"
        )
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise typer.BadParameter(f"unknown time zone {time_zone!r}", param_hint="--time-zone") from None
    chosen = resolve_month(month, time_zone, now())
    sources = ledger_sources(kubeconfig or [], context or [])
    try:
        ledgers = read_ledgers(sources, chosen)
    except LedgerUnreadableError as error:
        typer.echo(f"error: cannot read the ledger of {error}; no report was written", err=True)
        raise typer.Exit(1) from None
    if len(sources) == 1:
        built = build_report(ledgers[sources[0].name], chosen)
    else:
        built = build_merged_report(ledgers, chosen)
    if prometheus is not None:
        try:
            built = add_busy(built, prometheus, busy_step, now())
        except BusyUnreadableError as error:
            typer.echo(f"error: cannot read busy GPU-hours: {error}; no report was written", err=True)
            raise typer.Exit(1) from None
    unbalanced = built.unbalanced_pools()
    if unbalanced:
        for line in unbalanced:
            typer.echo(f"error: {line}", err=True)
        typer.echo("error: a pool's month record does not add up; no report was written", err=True)
        raise typer.Exit(1)
    data = render(built, format_name)
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = report_path(out, chosen, format_name)
    path.write_bytes(data)
    covered = f" ({len(sources)} clusters: {', '.join(built.clusters)})" if built.clusters else ""
    typer.echo(f"report {chosen}{covered}: {len(data):,} bytes written to {path}", err=True)


def main() -> None:
    app()
