"""A service's run loop: Kafka errors it did not handle end it in one line."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from gateway.errors import IotgwError
from gateway.services.runtime import serve

pytestmark = pytest.mark.unit


def test_an_unhandled_kafka_error_ends_the_service_in_one_line() -> None:
    """Not authorized for a topic: IotgwError (one line, exit code 1), not a traceback."""

    async def refused(stop: asyncio.Event) -> None:
        raise TopicAuthorizationFailedError()

    with pytest.raises(IotgwError, match="^Kafka failed for good: ") as error:
        serve(refused)
    assert error.value.exit_code == 1
    assert "\n" not in str(error.value)
