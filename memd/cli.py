"""The ``memd`` command line (SPEC §10). ``main(argv) -> int``; exit codes 0, 1, 2 and 78.

Commands: ``run`` (the daemon), ``once``, ``scan``, ``status [--json]``, ``show [PATH]``,
``consolidate --root DIR``, ``retry [THREAD]``, ``forget THREAD``, ``backfill --since DATE``,
``doctor``, ``service install``, ``bench``, and the read path (SPEC §18): ``context``,
``hooks install|uninstall claude|codex``, ``mcp`` and ``mcp install|uninstall claude|codex``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from memd import __version__
from memd.clock import SystemClock
from memd.errors import ConfigError, DatabaseDamaged, MemdError, StoreError, UsageError
from memd.extract.redact import redact
from memd.logging import configure_logging

if TYPE_CHECKING:
    from memd.config import Settings
    from memd.consolidate.builtin import BuiltinResult
    from memd.daemon import Daemon

log = structlog.get_logger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors exit 2 through main(), not sys.exit
        raise UsageError(f"{self.prog}: {message}")


def _add_source_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sessions",
        action="append",
        type=Path,
        metavar="DIR",
        help="rollout root (repeatable; replaces the configured roots)",
    )
    p.add_argument(
        "--min-idle", type=float, metavar="SECONDS", help="idle gate: seconds without new bytes (default 3600)"
    )
    p.add_argument("--max-age-days", type=float, metavar="DAYS", help="ignore threads idle for longer (0 = no limit)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = _Parser(
        prog="memd", description="memd: memory for coding agents (watches Codex and Claude Code session transcripts)."
    )
    parser.add_argument("--version", action="version", version=f"memd {__version__}")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML config file (default $XDG_CONFIG_HOME/memd/config.toml)"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level (default info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    _add_source_flags(p)
    p = sub.add_parser("once", help="scan, extract every eligible thread, consolidate, exit")
    _add_source_flags(p)
    p.add_argument("--dry-run", action="store_true", help="estimate the tokens a backfill would send; send nothing")
    p = sub.add_parser("scan", help="index the rollout roots (no extraction), print the status, exit")
    _add_source_flags(p)
    p = sub.add_parser("status", help="daemon, totals, queue, problems, leases, recently active projects")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--json", action="store_true", help="one JSON object (keys documented in the README)")
    view.add_argument("--threads", action="store_true", help="every thread, newest activity first")
    view.add_argument("--project", metavar="PATH", help="one project (a project key or a path inside it)")
    p = sub.add_parser("show", help="print a project's MEMORY.md")
    p.add_argument("path", nargs="?", default=None, help="a project key or a path inside the project (default: cwd)")
    p.add_argument("--summary", action="store_true", help="print memory_summary.md instead")
    p = sub.add_parser("consolidate", help="the built-in consolidator for memory roots")
    p.add_argument(
        "--root", type=Path, action="append", required=True, metavar="DIR", help="a project's memory root (repeatable)"
    )
    p.add_argument(
        "--offline",
        action="store_true",
        help="the deterministic merge, without reading the configuration (the daemon's fast start; "
        "needs --state-db and --max-unused-days)",
    )
    p.add_argument("--state-db", type=Path, metavar="FILE", help="with --offline: the state database (usage)")
    p.add_argument(
        "--max-unused-days", type=float, metavar="DAYS", help="with --offline: [consolidation] max_unused_days"
    )
    p = sub.add_parser("retry", help="re-queue failed or dead threads")
    p.add_argument("thread", nargs="?", default=None)
    p = sub.add_parser("forget", help="remove a thread's memory and reconsolidate its project")
    p.add_argument("thread")
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long to wait for a running consolidation of the project, seconds (default 30)",
    )
    p = sub.add_parser("backfill", help="process threads older than max_age_days, back to DATE")
    p.add_argument("--since", required=True, metavar="DATE", help="YYYY-MM-DD")
    p.add_argument("--dry-run", action="store_true", help="estimate the tokens the backfill would send; send nothing")
    _add_source_flags(p)
    sub.add_parser("doctor", help="check configuration, paths, inotify limits and the model endpoint")
    p = sub.add_parser("db", help="check, back up or recover the state database (SPEC §5)")
    p.add_argument("db_action", choices=["check", "backup", "recover"], metavar="ACTION", help="check|backup|recover")
    p.add_argument(
        "--sessions",
        action="append",
        type=Path,
        metavar="DIR",
        help="rollout roots recover reads (default: configured)",
    )
    p = sub.add_parser("service", help="systemd user service")
    svc = p.add_subparsers(dest="service_command", metavar="ACTION", parser_class=_Parser)
    q = svc.add_parser("install", help="write the user unit and print the systemctl lines")
    q.add_argument("--hardening", action="store_true", help="also install the hardening drop-in")
    q.add_argument("--force", action="store_true", help="overwrite an existing unit")
    p = sub.add_parser("context", help="print this project's memory for a new agent session (SessionStart hook)")
    p.add_argument("--cwd", metavar="DIR", help="a directory in the project (default: the current one)")
    p.add_argument("--budget", type=int, metavar="TOKENS", help="size limit (default [context] budget_tokens)")
    p.add_argument("--format", choices=["text", "json", "claude-hook", "codex-hook"], default="text")
    p = sub.add_parser("hooks", help="install or remove memd's SessionStart hook in Claude Code or Codex")
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("agent", choices=["claude", "codex"])
    p.add_argument("--project", type=Path, metavar="DIR", help="this project only (its .claude/ or .codex/)")
    p = sub.add_parser("mcp", help="run the read-only MCP server on stdio, or register it with an agent")
    p.add_argument("action", nargs="?", choices=["install", "uninstall"], help="register / unregister it")
    p.add_argument("agent", nargs="?", choices=["claude", "codex"])
    p.add_argument("--project", type=Path, metavar="DIR", help="Codex: this project's .codex/config.toml")
    p = sub.add_parser("bench", help="measure memd against SPEC §15 (synthetic corpus)")
    p.add_argument("--quick", action="store_true", help="smaller corpus, scaled figures (< 4 min on 2 cores)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "sessions", None):
        out["sessions"] = [p.expanduser() for p in args.sessions]
    if getattr(args, "min_idle", None) is not None:
        out["min_idle_s"] = args.min_idle
    if getattr(args, "max_age_days", None) is not None:
        out["max_age_days"] = args.max_age_days
    if getattr(args, "log_level", None):
        out["log_level"] = args.log_level
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``memd`` command.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 ok, 1 runtime failure, 2 usage, 78 configuration.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(parser.format_usage().rstrip(), file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    usage_error = _usage_error(parser, args)
    if usage_error is not None:
        return usage_error
    fast = _without_settings(args)
    if fast is not None:
        return fast
    if args.config is not None:  # child processes (the consolidation command) read the same file
        os.environ["MEMD_CONFIG"] = str(args.config.expanduser().absolute())
    from memd.config import load_settings  # pydantic-settings: imported only by commands that need it

    try:
        settings = load_settings(args.config, _overrides(args))
    except ConfigError as exc:
        configure_logging("info", stream=sys.stderr, redact=redact)
        log.error("config_invalid", error=str(exc))
        print(f"memd: configuration error: {exc}", file=sys.stderr)
        return exc.exit_code
    level = settings.log_level
    if args.command == "once" and sys.stderr.isatty() and level == "info":
        level = "warning"  # the progress bar and the summary own the terminal; warnings still show
    configure_logging(level, stream=sys.stdout if args.command == "run" else sys.stderr, redact=redact)
    try:
        return asyncio.run(_dispatch(args, settings))
    except KeyboardInterrupt:
        return 130
    except MemdError as exc:
        log.error("command_failed", command=args.command, error=str(exc))
        print(f"memd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: logged with its traceback, then one clear line and exit 1
        error = redact(f"{type(exc).__name__}: {exc}")[0]
        log.error("command_crashed", command=args.command, error=error, exc_info=exc)
        print(f"memd {args.command}: internal error ({error}); the log above has the traceback", file=sys.stderr)
        return 1


def _usage_error(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int | None:
    """Exit code 2 (with the message printed) for a command line that parsed but cannot run:
    no command, a missing action or agent, a ``--sessions`` folder that does not exist."""
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "service" and args.service_command is None:
        print("memd service: choose an action (install)", file=sys.stderr)
        return 2
    if args.command in ("hooks", "mcp") and args.action is not None and args.agent is None:
        print(f"memd {args.command} {args.action}: choose an agent (claude or codex)", file=sys.stderr)
        return 2
    missing = [p for p in getattr(args, "sessions", None) or [] if not p.expanduser().is_dir()]
    if missing:
        print(parser.format_usage().rstrip(), file=sys.stderr)
        print(f"memd {args.command}: --sessions {missing[0]}: no such directory", file=sys.stderr)
        return 2
    return None


def _without_settings(args: argparse.Namespace) -> int | None:
    """Run the commands that start without pydantic settings (their exit code), else ``None``:
    ``memd context``, ``memd mcp`` (the server) and ``memd consolidate --offline`` (the daemon's
    consolidation child)."""
    if args.command == "context":
        return _cmd_context(args)
    if args.command == "mcp" and args.action is None:
        return _cmd_mcp_serve(args)
    if args.command == "consolidate" and args.offline:
        return _consolidate_offline_args(args)
    return None


def entry() -> None:
    """Console-script entry point: ``sys.exit(main())``."""
    sys.exit(main())


def _cmd_context(args: argparse.Namespace) -> int:
    """``memd context``: no daemon, no pydantic settings, fail open in hook formats (memd.read.context)."""
    from memd.read.context import ContextFormat, ContextRequest, run

    request = ContextRequest(args.cwd, args.budget, ContextFormat(args.format), args.config)
    return run(request, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)


def _cmd_mcp_serve(args: argparse.Namespace) -> int:
    """``memd mcp``: the stdio MCP server (stdout is the protocol: every log goes to stderr)."""
    from memd.read.context import ContextConfigError, load_context_settings

    try:
        settings = load_context_settings(args.config)
    except ContextConfigError as exc:
        print(f"memd mcp: configuration error: {exc}", file=sys.stderr)
        return 78
    from memd.read.mcp import serve

    return serve(settings)


def _installation(args: argparse.Namespace, settings: Settings) -> Any:
    from memd.read.context import config_file
    from memd.read.hooks import Installation, find_memd

    config_path, _ = config_file(args.config, os.environ)
    return Installation(
        memd_path=find_memd(),
        config_path=config_path.absolute() if config_path is not None else None,
        state_dir=settings.state_dir.absolute(),
        memory_dir=settings.memory_dir.absolute(),
    )


def _print_changes(changes: Sequence[Any]) -> None:
    for change in changes:
        backup = f" (previous file kept as {change.backup})" if change.backup else ""
        print(f"{change.detail}{backup}")


async def _cmd_hooks(args: argparse.Namespace, settings: Settings) -> int:
    from memd.read.hooks import Agent, install_hook, uninstall_hook

    agent = Agent(args.agent)
    project = args.project.expanduser().absolute() if args.project else None
    if args.action == "uninstall":
        _print_changes(uninstall_hook(agent, os.environ, project))
        return 0
    _print_changes(install_hook(agent, _installation(args, settings), os.environ, project))
    if agent is Agent.CODEX:
        print(
            'Codex asks you to review and trust this new hook the next time it starts (choose "Review hooks" or '
            '"Trust all and continue"; later: /hooks). memd never records that trust itself.'
        )
    else:
        print("Claude Code runs it at the start of its next session (startup, /clear and after compaction).")
    return 0


async def _cmd_mcp_install(args: argparse.Namespace, settings: Settings) -> int:
    from memd.read.hooks import (
        install_claude_mcp,
        install_codex_mcp,
        uninstall_claude_mcp,
        uninstall_codex_mcp,
    )

    project = args.project.expanduser().absolute() if args.project else None
    if args.agent == "codex":
        if args.action == "uninstall":
            _print_changes([uninstall_codex_mcp(os.environ, project)])
        else:
            _print_changes([install_codex_mcp(_installation(args, settings), os.environ, project)])
        return 0
    if args.action == "uninstall":
        _print_changes([uninstall_claude_mcp()])
    else:
        _print_changes([install_claude_mcp(_installation(args, settings))])
    return 0


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    handler = {
        "run": _cmd_run,
        "once": _cmd_once,
        "scan": _cmd_scan,
        "status": _cmd_status,
        "show": _cmd_show,
        "consolidate": _cmd_consolidate,
        "retry": _cmd_retry,
        "forget": _cmd_forget,
        "backfill": _cmd_backfill,
        "doctor": _cmd_doctor,
        "db": _cmd_db,
        "service": _cmd_service,
        "bench": _cmd_bench,
        "hooks": _cmd_hooks,
        "mcp": _cmd_mcp_install,
    }[args.command]
    return await handler(args, settings)


def _check_state_dir(state_dir: Path) -> None:
    """The state directory must be creatable and writable: a configuration problem (exit 78, so
    systemd does not restart memd in a loop), not a runtime failure.

    Raises:
        ConfigError: it cannot be created or written.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"state_dir: {state_dir} cannot be created: {exc.strerror}") from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"state_dir: {state_dir} is not writable by this user")


async def _open_daemon(settings: Settings) -> Daemon:
    from memd.daemon import Daemon
    from memd.store.backup import backup_if_due, check_database, is_damage

    _check_state_dir(settings.state_dir)
    problems = await asyncio.to_thread(check_database, settings.db_path)
    if problems:
        raise DatabaseDamaged(_damaged_message(settings, problems[0]))
    saved = await asyncio.to_thread(backup_if_due, settings.db_path)
    if saved is not None:
        log.info("store_backed_up", path=str(saved), reason="daily")
    try:
        return await Daemon.open(settings)
    except StoreError as exc:
        if is_damage(exc):
            raise DatabaseDamaged(_damaged_message(settings, str(exc))) from None
        raise


def _damaged_message(settings: Settings, problem: str) -> str:
    return (
        f"the state database {settings.db_path} is damaged ({problem}); memd stops. "
        "Run `memd db recover` (the damaged file is kept aside, the newest good backup restored, "
        "and finished sessions are taken from the memory files, not sent to a model again)"
    )


async def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from memd.service.signals import ShutdownSignals

    daemon = await _open_daemon(settings)
    signals = ShutdownSignals()
    signals.install(asyncio.get_running_loop())
    try:
        return await daemon.serve(signals)
    finally:
        signals.uninstall()
        await daemon.close()


async def _cmd_once(args: argparse.Namespace, settings: Settings) -> int:
    from memd.extract.pool import PauseKind

    daemon = await _open_daemon(settings)
    try:
        if args.dry_run:
            return await _dry_run(daemon)
        bar = None
        progress = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=0, unit="thread", desc="extracting", file=sys.stderr)

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            summary = await daemon.once(progress=progress)
        finally:
            if bar is not None:
                bar.close()
        print(
            f"memd once: {summary.extracted} extracted ({summary.noop} with nothing durable), "
            f"{summary.failed} failed, {summary.consolidated} projects consolidated"
            f"{f', {summary.consolidation_failed} consolidations failed' if summary.consolidation_failed else ''}"
            f" in {summary.duration_s:.1f} s"
        )
        print(f"memory: {settings.memory_dir}")
        known = await daemon.components.store.threads.count() if not summary.extracted else 0
        for line in _once_explanation(summary, settings, known):
            print(line, file=sys.stderr if summary.failed else sys.stdout)
        paused = daemon.components.pool.paused_reason
        if paused:
            print(f"memd once: model work paused: {paused}; the remaining threads stay queued", file=sys.stderr)
        auth_failed = daemon.components.pool.pause_kind is PauseKind.MODEL_AUTH
        return 1 if summary.failed or summary.consolidation_failed or auth_failed else 0
    finally:
        await daemon.close()


def _once_explanation(summary: Any, settings: Settings, known_threads: int = 0) -> list[str]:
    """Why ``memd once`` did what it did: the failures (how many, and why), or, when nothing was
    extracted, what held the sessions back (idle gate, age limit, nothing eligible, or
    ``known_threads`` sessions unchanged since an earlier run planned them)."""
    lines: list[str] = []
    if summary.failed:
        lines.append(f"memd once: {summary.failed} extraction(s) failed:")
        shown = summary.failures[:5]
        lines += [f"  {thread_id}: {redact(error)[0]}" for thread_id, error in shown]
        if summary.failed > len(shown):
            lines.append(f"  ... and {summary.failed - len(shown)} more (memd status shows each last error)")
        return lines
    plan = summary.plan
    if summary.extracted or plan is None:
        return lines
    reasons = []
    if plan.idle_wait:
        wait = f", the next in {plan.next_due_s:.0f} s" if plan.next_due_s is not None else ""
        reasons.append(
            f"{plan.idle_wait} waiting on the idle gate "
            f"(min_idle_s = {settings.min_idle_s:g}{wait}; --min-idle 0 skips it)"
        )
    if plan.too_old:
        reasons.append(
            f"{plan.too_old} older than max_age_days = {settings.max_age_days:g} "
            "(--max-age-days 0 or memd backfill --since DATE)"
        )
    if plan.up_to_date:
        reasons.append(f"{plan.up_to_date} already up to date")
    if plan.not_eligible:
        reasons.append(f"{plan.not_eligible} not eligible (source excluded, or no user message)")
    if plan.dead:
        reasons.append(f"{plan.dead} gave up after their attempts (memd retry)")
    if not reasons and known_threads:  # planning looks only at sessions changed since the last pass
        reasons.append(f"{known_threads} known sessions unchanged since they were last planned")
    if not reasons:
        roots = ", ".join(str(p) for p in settings.sessions)
        reasons.append(f"nothing eligible: no sessions found under {roots}")
    lines.append("0 extracted: " + "; ".join(reasons))
    return lines


async def _dry_run(daemon: Daemon) -> int:
    """Estimate the model input a run (or a backfill) would send; send nothing.

    Every eligible thread's input is built exactly as for the model (filter, redact, fit
    ``[llm].max_input_tokens``) and framed by the prompt templates; the bytes are converted to
    tokens with the calibrated estimate (SPEC §6.2). The queue is planned as a run would plan it.
    """
    from memd.errors import RolloutError
    from memd.extract.openai_extractor import render_prompt
    from memd.store.records import JobKind, JobStatus

    c = daemon.components
    await c.indexer.scan()
    plan = await c.scheduler.plan()
    # A pass looks only at changed threads: jobs queued by an earlier pass are estimated too.
    queued = dict.fromkeys(plan.queued_ids)
    for status in (JobStatus.PENDING, JobStatus.ERROR):
        queued.update(dict.fromkeys(j.key for j in await c.store.jobs.list_all(JobKind.EXTRACT, status)))
    total_tokens = total_bytes = threads = unreadable = 0
    for thread_id in queued:
        thread = await c.store.threads.get(thread_id)
        if thread is None:
            continue
        try:
            request = await c.requests.build(thread, c.settings.llm.max_input_tokens)
        except (RolloutError, OSError):
            unreadable += 1
            continue
        system, user = render_prompt(request, request.built)
        size = len(system.encode()) + len(user.encode())
        total_bytes += size
        total_tokens += c.estimator.estimate(size)
        threads += 1
    skipped = f" ({unreadable} unreadable, skipped)" if unreadable else ""
    print(
        f"memd once --dry-run: {threads} threads would be extracted{skipped}; about {total_tokens} input "
        f"tokens ({total_bytes} bytes, prompts included, {c.estimator.bytes_per_token:.2f} bytes per token) "
        f"would be sent to the model, plus the answers. Nothing was sent."
    )
    if c.extractor_name != "openai":
        print(f"note: the extractor is {c.extractor_name} ({c.extractor_reason}): a real run sends nothing either")
    return 0


async def _cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    daemon = await _open_daemon(settings)
    try:
        indexer = daemon.components.indexer
        await indexer.scan()
        for thread in await daemon.components.store.threads.list_all():
            await indexer.catch_up(thread.id)
    finally:
        await daemon.close()
    # after this process unregistered
    return await _cmd_status(argparse.Namespace(json=False, threads=False, project=None), settings)


async def _print_status(store: Any, settings: Settings, extractor: str, reason: str, args: argparse.Namespace) -> int:
    from memd import status

    out = sys.stdout
    budget = settings.daily_token_budget
    if args.json:
        await status.write_json(
            store, SystemClock(), out, extractor=extractor, extractor_reason=reason, daily_token_budget=budget
        )
    elif args.threads:
        if not await status.write_threads(store, out):
            out.write("no threads yet\n")
    elif args.project is not None:
        if not await status.write_project(store, out, _project_candidates(args.project, settings.project_key)):
            print(f"memd status: no project {args.project} (no thread and no memory)", file=sys.stderr)
            return 1
    else:
        await status.write_overview(
            store, SystemClock(), out, extractor=extractor, extractor_reason=reason, daily_token_budget=budget
        )
    return 0


async def _running_extractor(store: Any, settings: Settings) -> tuple[str, str]:
    """The extractor a running daemon recorded at start (its environment may hold the API key
    when this shell's does not), else what this configuration selects."""
    from memd.store.daemons import daemon_alive

    recorded = await store.meta.get("extractor")
    now = SystemClock().now()
    if recorded and ": " in recorded and any(daemon_alive(d, now) for d in await store.daemons.list_all()):
        name, reason = recorded.split(": ", 1)
        return name, f"{reason} (as chosen by the running daemon)"
    return settings.resolved_extractor()


async def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from memd.store.store import Store

    store = await Store.open(settings.db_path, clock=SystemClock())
    try:
        name, reason = await _running_extractor(store, settings)
        return await _print_status(store, settings, name, reason, args)
    finally:
        await store.close()


def _project_candidates(target: str, rule: str) -> list[str]:
    """Project keys that may hold ``target``: its own key (a project key, or a path inside a git
    project), then the normalised path and each parent directory (a path inside a project keyed
    by its cwd), nearest first."""
    from memd.rollout.project import normalise_cwd, project_key

    keys = [project_key(target, rule=rule)]
    path = Path(normalise_cwd(target))
    if path.is_absolute():
        keys += [str(p) for p in (path, *path.parents)]
    return list(dict.fromkeys(keys))


async def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from memd.memory import files as memory_files

    target = args.path or os.getcwd()
    name = "memory_summary.md" if args.summary else "MEMORY.md"
    candidates = _project_candidates(target, settings.project_key)
    for key in candidates:
        path = memory_files.project_root(settings.memory_dir, key) / name
        if path.is_file():
            sys.stdout.write(path.read_text(encoding="utf-8"))
            return 0
    print(
        f"memd show: no {name} for {target} (project {candidates[0]}; memory in {settings.memory_dir})", file=sys.stderr
    )
    return 1


def _retention_policy(root: Path, db_path: Path, max_unused_days: float) -> Any:
    """Usage of this memory root's project (from the state database, when there is one) and
    ``max_unused_days``."""
    import sqlite3

    from memd.consolidate.retention import RetentionPolicy
    from memd.store.search import SearchIndex

    usage: dict[Any, Any] = {}
    try:
        project = (root / "PROJECT").read_text(encoding="utf-8").strip()
        index = SearchIndex.open(db_path)
        if index is not None and project:
            try:
                usage = dict(index.usage(project))
            finally:
                index.close()
    except (OSError, sqlite3.Error) as exc:
        log.warning("usage_unavailable", root=str(root), error=str(exc))
    return RetentionPolicy(usage=usage, max_unused_days=max_unused_days)


def _report_root(root: Path, outcome: BuiltinResult | MemdError) -> bool:
    """Log one root's outcome and print its result line (read by the consolidation runner).

    Returns:
        Whether the root was consolidated.
    """
    from memd.consolidate.builtin import RootOutcome

    if isinstance(outcome, MemdError):
        print(f"memd consolidate: {outcome}", file=sys.stderr, flush=True)
        print(RootOutcome(str(root), False, str(outcome)).line(), flush=True)
        return False
    log.info(
        "consolidate_done",
        root=str(root),
        traces=outcome.traces,
        memory_changed=outcome.memory_changed,
        skills_changed=outcome.skills_changed,
    )
    print(RootOutcome(str(root), True).line(), flush=True)
    return True


def _unexpected(root: Path, exc: Exception) -> MemdError:
    """An unexpected exception of one root's consolidation, logged with its traceback and turned
    into that root's failed outcome (the message redacted, SPEC §14)."""
    from memd.errors import ConsolidationError

    message = redact(f"{type(exc).__name__}: {exc}")[0]
    log.error("consolidate_root_crashed", root=str(root), error=message, exc_info=True)
    return ConsolidationError(f"unexpected error: {message}")


def _consolidate_offline(roots: Sequence[Path], *, db_path: Path, max_unused_days: float) -> int:
    """The deterministic merge of each root in turn (with usage-based retention), without the
    event loop or the model client.

    Returns:
        0 when every root was consolidated, else 1 (each root's outcome is on its result line).
    """
    from memd.consolidate.builtin import consolidate_root, offline_writer
    from memd.consolidate.retention import retaining

    ok = True
    for given in roots:
        root = given.expanduser()
        try:
            policy = _retention_policy(root, db_path, max_unused_days)
            outcome: BuiltinResult | MemdError = consolidate_root(root, writer=retaining(offline_writer, policy))
        except MemdError as exc:
            outcome = exc
        except Exception as exc:  # one root's unexpected failure never fails the rest of the batch
            outcome = _unexpected(root, exc)
        ok = _report_root(given, outcome) and ok
    return 0 if ok else 1


def _consolidate_offline_args(args: argparse.Namespace) -> int:
    """``memd consolidate --offline``: what the daemon's child runs when its extractor is offline.
    The configuration is not read (a fast start: no pydantic-settings); the daemon passes what
    consolidation needs from it (``--state-db``, ``--max-unused-days``)."""
    configure_logging(args.log_level or "info", stream=sys.stderr, redact=redact)
    if args.state_db is None or args.max_unused_days is None:
        print("memd consolidate: --offline needs --state-db and --max-unused-days", file=sys.stderr)
        return 2
    return _consolidate_offline(args.root, db_path=args.state_db, max_unused_days=args.max_unused_days)


async def _cmd_consolidate(args: argparse.Namespace, settings: Settings) -> int:
    """The built-in consolidator for each ``--root`` in turn (SPEC §7): one model request per
    root when the model extractor is configured (refused, sending nothing, when today's token
    budget is spent), else the deterministic merge; outputs staged and swapped in. Each root's
    outcome is logged and printed as a result line; one failing root does not stop the others.

    Returns:
        0 when every root was consolidated, else 1.
    """
    max_unused_days = settings.consolidation.max_unused_days
    if settings.resolved_extractor()[0] != "openai":
        return await asyncio.to_thread(
            _consolidate_offline, args.root, db_path=settings.db_path, max_unused_days=max_unused_days
        )
    from memd.consolidate.builtin import consolidate_root
    from memd.consolidate.model import ModelWriter
    from memd.consolidate.retention import retaining
    from memd.daemon import llm_config
    from memd.llm.budget import DailyBudget, TokenEstimator
    from memd.llm.client import LLMClient
    from memd.store.store import Store

    clock = SystemClock()
    ok = True
    store = await Store.open(settings.db_path, clock=clock)
    try:
        estimator = TokenEstimator.from_json(await store.meta.get("token_estimator"))
        model = settings.consolidation.model or settings.llm.model
        client = LLMClient(llm_config(settings, model=model), usage=store.usage, clock=clock)
        try:
            for given in args.root:
                root = given.expanduser()
                try:
                    await DailyBudget(settings.daily_token_budget, store.usage, clock).check()
                    policy = _retention_policy(root, settings.db_path, max_unused_days)
                    writer = ModelWriter(
                        client, root=root, max_input_tokens=settings.llm.max_input_tokens, estimator=estimator
                    )
                    loop = asyncio.get_running_loop()
                    outcome: BuiltinResult | MemdError = await asyncio.to_thread(
                        consolidate_root, root, writer=retaining(writer.sync_writer(loop), policy)
                    )
                except MemdError as exc:
                    outcome = exc
                except Exception as exc:  # one root's unexpected failure never fails the rest of the batch
                    outcome = _unexpected(root, exc)
                ok = _report_root(given, outcome) and ok
        finally:
            await client.aclose()
    finally:
        await store.close()
    return 0 if ok else 1


async def _cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    from memd.store.store import Store

    store = await Store.open(settings.db_path, clock=SystemClock())
    try:
        count = await store.jobs.retry(args.thread)
    finally:
        await store.close()
    print(f"memd retry: {count} job(s) re-queued")
    return 0


async def _cmd_forget(args: argparse.Namespace, settings: Settings) -> int:
    """``memd forget THREAD``: see :func:`memd.forget.forget`."""
    from memd.forget import FORGET_WAIT_S, ForgetStatus, forget

    outcome = await forget(settings, args.thread, wait_s=FORGET_WAIT_S if args.wait is None else args.wait)
    if outcome.status is ForgetStatus.UNKNOWN:
        print(f"memd forget: no memory for thread {args.thread}", file=sys.stderr)
        return 1
    if outcome.status is ForgetStatus.LEASE_HELD:
        print(
            f"memd forget: a consolidation of {outcome.project} holds its lease"
            f" ({outcome.holder or 'another daemon'}); nothing was changed; try again once it has ended",
            file=sys.stderr,
        )
        return 1
    if outcome.status is ForgetStatus.NOT_EXTRACTED:
        print(f"memd forget: {args.thread} had no memory yet; it will not be extracted")
        return 0
    history = "; git history re-rooted (earlier commits deleted, a new one at the next consolidation)"
    print(
        f"memd forget: removed the memory of {args.thread} (files, search index{history if outcome.rerooted else ''}); "
        f"it will not be extracted again; {outcome.project} will be reconsolidated"
    )
    return 0


async def _cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = datetime.strptime(args.since, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise UsageError(f"memd backfill: --since must be YYYY-MM-DD, got {args.since!r}") from None
    days = max(1.0, (datetime.now(tz=UTC) - since).total_seconds() / 86_400.0)
    settings = settings.model_copy(update={"max_age_days": days})
    return await _cmd_once(args, settings)


async def _cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from memd.config import default_config_path
    from memd.doctor import run_doctor

    named = os.environ.get("MEMD_CONFIG")  # main() sets it from --config
    config_path = Path(named).expanduser() if named else default_config_path()
    return await run_doctor(settings, config_path=config_path if config_path.is_file() else None)


async def _cmd_service(args: argparse.Namespace, settings: Settings) -> int:
    from memd.service.unit import default_exec_start, install_unit, user_config_home

    result = install_unit(
        config_home=user_config_home(os.environ),
        exec_start=default_exec_start(),
        hardening=args.hardening,
        force=args.force,
    )
    print(result.message if hasattr(result, "message") else result)
    return 0


async def _cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    from memd.bench.harness import run_bench
    from memd.daemon import build_components

    await asyncio.to_thread(
        run_bench, quick=args.quick, json_path=args.json, workdir=None, settings=settings, factory=build_components
    )
    return 0


async def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """``memd db check | backup | recover`` (SPEC §5)."""
    from memd.store import backup

    db_path = settings.db_path
    if args.db_action == "check":
        problems = await asyncio.to_thread(backup.check_database, db_path, full=True)
        if problems:
            print(f"memd db check: {db_path} is damaged: " + "; ".join(problems[:5]), file=sys.stderr)
            print("run `memd db recover`", file=sys.stderr)
            return 1
        newest = backup.backups(db_path)
        print(f"memd db check: {db_path} is sound; backups: {', '.join(p.name for p in newest) or 'none'}")
        return 0
    if args.db_action == "backup":
        if not db_path.exists():
            print(f"memd db backup: no database at {db_path}", file=sys.stderr)
            return 1
        saved = await asyncio.to_thread(backup.backup_database, db_path)
        print(f"memd db backup: {saved}")
        return 0
    return await _db_recover(settings)


async def _db_recover(settings: Settings) -> int:
    """Move the damaged database aside, restore the newest good backup, then reconcile with the
    memory files: every trace on disk whose session is unchanged gets its row back (no model call)."""
    from memd.daemon import build_components
    from memd.memory.recover import traces_on_disk
    from memd.store.backup import check_database, restore_newest_backup
    from memd.store.records import MemoryRecord

    db_path = settings.db_path
    problems = await asyncio.to_thread(check_database, db_path)
    restored = await asyncio.to_thread(restore_newest_backup, db_path)
    if restored.damaged is not None:
        state = "damaged: " + problems[0] if problems else "sound"
        print(f"memd db recover: the previous database ({state}) is kept at {restored.damaged}")
    for skipped in restored.skipped:
        print(f"memd db recover: backup {skipped.name} is damaged too; skipped")
    if restored.backup is not None:
        print(f"memd db recover: restored {restored.backup.name}")
    else:
        print("memd db recover: no good backup; starting from an empty database")
    components = await build_components(settings)
    store, indexer = components.store, components.indexer
    try:
        await indexer.scan()
        traces, consolidated = await asyncio.to_thread(traces_on_disk, settings.memory_dir)
        threads = {}
        for thread_id in {t.header.thread_id for t in traces}:
            # Read the session to its end (as the scheduler does) so its watermark is current.
            caught = await indexer.catch_up(thread_id)
            if caught is not None:
                threads[thread_id] = caught.thread
        rows = []
        stale = 0
        for trace in traces:
            thread = threads.get(trace.header.thread_id)
            if thread is None:
                continue
            # The header's source watermark says which bytes the trace covers (older traces lack it:
            # then the session's last activity must not be newer than the trace's).
            watermark = trace.header.source_watermark or thread.watermark
            if watermark < thread.watermark or (
                not trace.header.source_watermark and trace.header.updated_at + 1.0 < thread.updated_at
            ):
                stale += 1  # the session grew after this trace: it is extracted again, as usual
                continue
            rows.append(
                MemoryRecord(
                    thread_id=thread.id,
                    project=trace.project,
                    path=trace.relpath,
                    trace_memory=trace.body,
                    summary=trace.summary,
                    source_watermark=watermark,
                    generated_at=trace.mtime,
                    extractor="recovered",
                    tokens_in=0,
                    tokens_out=0,
                )
            )
        roots = {t.project: t.memory_root for t in traces}
        back = await store.memories.restore(rows, memory_roots=roots, consolidated=consolidated)
    finally:
        await components.aclose()
    indexed = await asyncio.to_thread(_rebuild_search_index, settings)
    print(
        f"memd db recover: {len(traces)} trace files on disk, {back} memories taken from them, "
        f"{stale} sessions grew since their trace and will be extracted again; "
        f"search index rebuilt for {indexed} projects"
    )
    return 0


def _rebuild_search_index(settings: Settings) -> int:
    """Index every project folder under ``memory_dir`` again (after a restore); returns the projects indexed.

    The memory-use ledger cannot be rebuilt from the files: uses recorded after the restored
    backup are lost.
    """
    from memd.store.search import SearchIndex

    index = SearchIndex.open(settings.db_path)
    if index is None:
        return 0
    try:
        return index.rebuild(settings.memory_dir)
    finally:
        index.close()
