"""gc-registry: run the registry service."""

from __future__ import annotations

import click
import uvicorn

from gc_core.logs import configure_logging
from gc_core.registry.app import RegistrySettings, create_app
from gc_core.settings import resolve_settings

__all__ = ["main"]


@click.group()
def main() -> None:
    """The gc-fabric registry: functions, endpoints and the task ledger."""


@main.command()
@click.option("--db", "db_url", default=None, metavar="URL",
              help="SQLAlchemy database URL [default: sqlite:///$GC_HOME/registry.db]. "
                   "PostgreSQL: postgresql+psycopg://user@host/dbname")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on.")
@click.option("--broker-url", default=None, metavar="URL",
              help="Broker the ledger consumes from [default: $GC_BROKER_URL or the local one].")
@click.option("--no-ledger", is_flag=True, help="Do not consume the task ledger queue.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def serve(db_url: str | None, host: str, port: int, broker_url: str | None, no_ledger: bool,
          log_level: str) -> None:
    """Serve the registry's HTTP API and record the task ledger."""
    configure_logging(log_level)
    fabric = resolve_settings(broker_url=broker_url)
    if db_url is None:
        fabric.home.mkdir(parents=True, exist_ok=True)
        db_url = f"sqlite:///{fabric.home / 'registry.db'}"
    settings = RegistrySettings(db_url=db_url, broker_url=fabric.broker_url, ledger=not no_ledger)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower(),
                access_log=False)


if __name__ == "__main__":
    main()
