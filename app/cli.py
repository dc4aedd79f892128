"""The `tuneserve` command: up, serve, worker, migrate, keys, validate."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from app.config import ENV_PREFIX, Settings, SettingsError, get_settings
from app.supervisor import SupervisedProcess

if TYPE_CHECKING:  # the commands import the database modules only when they run
    from sqlalchemy.orm import Session, sessionmaker


def _sessionmaker(settings: Settings) -> sessionmaker[Session]:
    from app.db import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(settings.database_url_resolved))


def _prepare(settings: Settings) -> None:
    from app import migrate

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.database_url_resolved)


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    _prepare(settings)
    print("database is at the latest revision")
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.errors import TuneserveError
    from app.services import keys

    with session_scope(_sessionmaker(settings)) as session:
        try:
            if args.keys_command == "create":
                key = keys.create_key(session, args.project)
                print(f"created a key for project {args.project!r}; it is shown only now:")
                print(key)
            elif args.keys_command == "list":
                for project, prefix, created_at, revoked_at in keys.list_keys(session):
                    state = "revoked" if revoked_at else "active"
                    print(f"{prefix}…\t{project}\t{state}\tcreated {created_at}")
            else:
                keys.revoke_key(session, args.prefix)
                print(f"revoked the key {args.prefix}…")
        except TuneserveError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    return 0


def cmd_validate(_settings: Settings, args: argparse.Namespace) -> int:
    from app.datasets import validate_path

    path = Path(args.file)
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        return 1
    report = validate_path(path)
    print(report.summary())
    return 0 if report.ok else 1


def _serve(
    settings: Settings, on_ready: Callable[[], None] | None = None, role: Literal["api", "inference"] = "api"
) -> None:
    """Run the API until stopped; `on_ready` is called once it answers requests (/readyz included)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from app.api.request_id import uvicorn_log_config
    from app.main import create_app

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            # `started` is set only once the lifespan has built the app's state and the socket listens.
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

    config = uvicorn.Config(
        create_app(settings, role=role),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(),
        # On SIGTERM, in-flight requests get this long to finish; then what remains is cancelled (streams end,
        # their sequences stop), so a slow or stuck client cannot hold a deploy.
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a foreground server is meant to stop
        server.run()
    if not server.started:  # the port was taken or the app failed to start: fail as uvicorn.run does
        sys.exit(STARTUP_FAILURE)


def cmd_serve(settings: Settings, _args: argparse.Namespace) -> int:
    _serve(settings)
    return 0


def cmd_inference(settings: Settings, _args: argparse.Namespace) -> int:
    """An inference replica: the inference routes on this machine's accelerator, for requests its API forwards."""
    if not settings.internal_token or settings.inference != "on":
        message = "tuneserve: an inference replica needs TUNESERVE_INTERNAL_TOKEN (the API's) and inference on"
        print(message, file=sys.stderr)
        return 2
    _serve(settings, role="inference")
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from app.jobs.broker import TRAINING_QUEUE
    from worker.celery_app import celery_app

    devices = settings.train_devices if args.devices is None else args.devices
    if args.devices is not None:
        # The worker reads its settings afresh (worker/context.py); the flag wins over the environment.
        os.environ[f"{ENV_PREFIX}TRAIN_DEVICES"] = str(args.devices)
        get_settings.cache_clear()
    import torch

    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        print(
            f"tuneserve: --devices {devices}, but this machine has {torch.cuda.device_count()} GPU(s)", file=sys.stderr
        )
        return 2

    celery_app.worker_main(
        ["worker", "--queues", TRAINING_QUEUE, "--pool", "solo", "--loglevel", settings.log_level.upper()]
    )
    return 0


def _default_key_line(settings: Settings) -> str:
    from app.db import session_scope
    from app.services import keys

    with session_scope(_sessionmaker(settings)) as session:
        if settings.api_key:
            keys.create_key(session, "default", settings.api_key)
            return f"API key (project default, from TUNESERVE_API_KEY): {settings.api_key}"
        if keys.project_has_keys(session, "default"):
            return "API key: the one shown at first start (make another: tuneserve keys create --project default)"
        return f"API key (project default; shown once, keep it): {keys.create_key(session, 'default')}"


def cmd_up(settings: Settings, _args: argparse.Namespace) -> int:
    """Everything in one process group: migrate, one worker on the embedded broker (restarted if it dies), and
    the API."""
    _prepare(settings)
    key_line = _default_key_line(settings)
    worker = SupervisedProcess([sys.executable, "-m", "app.cli", "worker"], "worker")
    worker.start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into an exit so `finally` stops the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def announce() -> None:
        print(f"tuneserve is up at http://{settings.host}:{settings.port}/v1", flush=True)
        print(key_line, flush=True)

    try:
        _serve(settings, on_ready=announce)
    finally:
        worker.stop(timeout=30)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneserve", description="Self-hosted LoRA fine-tuning service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="migrate, then run the API and one worker (embedded default)").set_defaults(fn=cmd_up)
    sub.add_parser("serve", help="run the API only").set_defaults(fn=cmd_serve)
    sub.add_parser("inference", help="run an inference replica for an API").set_defaults(fn=cmd_inference)
    worker = sub.add_parser("worker", help="run a Celery training worker")
    worker.add_argument(
        "--devices", type=_positive, help="train each job data-parallel on this many devices (TUNESERVE_TRAIN_DEVICES)"
    )
    worker.set_defaults(fn=cmd_worker)
    sub.add_parser("migrate", help="upgrade the database to the latest revision").set_defaults(fn=cmd_migrate)
    keys = sub.add_parser("keys", help="manage API keys")
    keys.set_defaults(fn=cmd_keys)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the project if needed)")
    create.add_argument("--project", required=True)
    keys_sub.add_parser("list", help="list key prefixes")
    revoke = keys_sub.add_parser("revoke", help="revoke the key with this prefix")
    revoke.add_argument("prefix")
    validate = sub.add_parser("validate", help="check a JSONL training file as an upload would")
    validate.add_argument("file")
    validate.set_defaults(fn=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"tuneserve: {exc}", file=sys.stderr)
        return 2
    return args.fn(settings, args)


if __name__ == "__main__":
    sys.exit(main())
