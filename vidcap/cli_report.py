"""`vidcap report`: wiring between the command line, vidcap.report (an output dir) and vidcap.pending
(what the cluster still has, with --remote)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from vidcap import config, pending, report
from vidcap.cli_common import ConfigOpt, ProfileOpt, _fail, err, out, profile_name
from vidcap.errors import UsageError, VidcapError


def report_cmd(
    out_dir: Path | None = typer.Argument(
        None,
        help="A caption output directory (default: captions/<model tag> of the profile, where vidcap sync "
        "puts the cluster's records).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json"),
    remote_: bool = typer.Option(
        False,
        "--remote",
        help="Also list the cluster over SSH: videos with no record there, records not synced here yet, "
        "failures there.",
    ),
    source: str | None = typer.Option(
        None,
        "--source",
        metavar="PATH",
        help="With --remote: the cluster directory whose videos are counted (default: the directory of the "
        "profile's newest captioning job, else paths.videos_dir).",
    ),
    profile: str | None = ProfileOpt,
    config_path: Path | None = ConfigOpt,
) -> None:
    """Counts, failures by class, tokens, latency percentiles and throughput of an output directory;
    with --remote, what is still pending on the cluster next to it.

    Exit codes: 0 reported, 2 usage or config error, 3 cannot reach the cluster.
    """
    try:
        if source is not None and not remote_:
            raise UsageError("--source goes with --remote")
        cfg = name = None
        if out_dir is None or remote_:
            cfg, _ = config.load(config_path)
            name = profile_name(cfg, profile)
        defaulted = out_dir is None
        if out_dir is None:
            assert cfg is not None and name is not None
            out_dir = pending.default_local_dir(cfg, cfg.profile(name))
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"{out_dir} is not a directory")
        if not out_dir.exists() and not remote_:
            raise UsageError(
                f"{out_dir} (the synced captions of profile {name!r}) does not exist: run 'vidcap sync' "
                "first, pass OUT_DIR, or add --remote to see what the cluster has"
                if defaulted
                else f"{out_dir} does not exist"
            )
        rep = report.build(out_dir) if out_dir.is_dir() else None
        pend = None
        if remote_:
            assert cfg is not None and name is not None
            pend = pending.check(cfg, name, out_dir, source)
    except VidcapError as exc:
        _fail(exc)
        return
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if as_json:
        data = (rep or report.Report(out=str(out_dir))).to_dict()
        if pend is not None:
            data["remote"] = pend.to_dict()
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    if rep is None:
        out.print(
            f"vidcap report: {out_dir} does not exist here yet (run 'vidcap sync')",
            highlight=False,
            markup=False,
        )
    else:
        table = Table(title=f"vidcap report: {out_dir}", show_header=False)
        rows = [
            ("captions", str(rep.records)),
            ("models", ", ".join(f"{k} ({v})" for k, v in rep.models.items()) or "-"),
            ("video hours", f"{rep.video_hours:.2f}"),
            ("windowed", str(rep.windowed)),
            ("with audio", f"{rep.with_audio} ({rep.audio_unverified} where the server was seen to drop it)"),
            ("tokens", f"{rep.prompt_tokens} prompt + {rep.completion_tokens} completion"),
            ("latency (s)", " ".join(f"{k}={v}" for k, v in rep.latency_s.items()) or "-"),
            ("throughput", f"{rep.throughput_videos_per_s} videos/s over {rep.runs} runs"),
            *(
                [("unfinished runs", f"{rep.running_or_killed} (still running, or killed)")]
                if rep.running_or_killed
                else []
            ),
            ("failures", f"{rep.failures} " + " ".join(f"{k}={v}" for k, v in rep.failures_by_class.items())),
        ]
        if rep.temp_files:
            rows.append(
                ("temp files", f"{rep.temp_files} left by an interrupted run; the next run replaces them")
            )
        for k, v in rows:
            table.add_row(k, v)
        out.print(table)
        for f in rep.failed_paths:
            out.print(f"  [red]{f['error']}[/] {f['path']!r}: {f['message']}", highlight=False)
    if pend is None:
        return
    cluster = Table(title="cluster: pending", show_header=False)
    cluster.add_column()
    cluster.add_column(overflow="fold")  # paths whole, never cut with an ellipsis
    classes = " ".join(f"{k}={v}" for k, v in pend.cluster_failures_by_class.items())
    cluster_rows = [
        (
            "cluster dir",
            f"{pend.host}:{pend.cluster_dir}" + ("" if pend.cluster_dir_exists else " (not there yet)"),
        ),
        ("records there", str(pend.cluster_records)),
        ("not yet synced", f"{pend.not_synced} (run 'vidcap sync')" if pend.not_synced else "0"),
        ("no record there", f"{pend.uncaptioned} of {pend.videos} videos under {pend.source}"),
        ("failures there", f"{pend.cluster_failures} {classes}".rstrip()),
    ]
    if pend.local_newer:
        cluster_rows.append(("newer here", f"{pend.local_newer} (vidcap sync keeps the local copy)"))
    if pend.local_only:
        cluster_rows.append(("only here", f"{pend.local_only} records the cluster does not have"))
    for k, v in cluster_rows:
        cluster.add_row(escape(k), escape(v))
    out.print(cluster)
    for title, paths, count in (
        ("not yet synced", pend.not_synced_paths, pend.not_synced),
        ("no record on the cluster", pend.uncaptioned_paths, pend.uncaptioned),
    ):
        if paths:
            more = f" (first {len(paths[:10])} of {count})" if count > 10 else ""
            out.print(f"{title}{more}:", highlight=False)
            for path in paths[:10]:
                out.print(f"  {path!r}", highlight=False, markup=False, soft_wrap=True)
    for note in pend.warnings:
        err.print(f"note: {note}", highlight=False, markup=False)
