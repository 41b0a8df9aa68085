"""`iotgw topics`: iotgw's Kafka topics."""

from __future__ import annotations

import asyncio

import typer
from rich.table import Table

from gateway.adapters.kafka import TopicResult, ensure_topics
from gateway.cli.terminal import console
from gateway.settings import load_settings

__all__ = ["topic_table", "topics_app"]

topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)


def topic_table(topics: list[TopicResult]) -> Table:
    table = Table("topic", "partitions", "replication", "")
    for topic in topics:
        table.add_row(
            topic.name, str(topic.partitions), str(topic.replication),
            "created" if topic.created else "exists",
        )  # fmt: skip
    return table


@topics_app.command("create")
def topics_create() -> None:
    """Create iotgw's topics on the configured Kafka; existing topics are left as they are."""
    settings = load_settings()
    console.print(topic_table(asyncio.run(ensure_topics(settings))))
