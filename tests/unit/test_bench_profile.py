"""The benchmark's profile: py-spy's samples charged to the stage of their innermost frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.bench.profile import stages

pytestmark = pytest.mark.unit

SESSION = 'process 1:"python -m gateway run bridge";main (gateway/cli/app.py:10)'
WORKER = f'{SESSION};process 2:"python -m gateway.services.bridge.worker 8 0"'


def test_samples_go_to_the_stage_of_their_innermost_known_frame(tmp_path: Path) -> None:
    """Library frames under a stage count for it; unknown frames are "other"."""
    raw = tmp_path / "profile.txt"
    raw.write_text(
        f"{WORKER};handle (gateway/services/bridge/worker.py:119);"
        "process (gateway/domain/validation.py:106);"
        "validate_json (pydantic/type_adapter.py:466) 6\n"
        f"{WORKER};_send (gateway/services/bridge/publisher.py:193);"
        "append (aiokafka/producer/message_accumulator.py:77) 2\n"
        f"{SESSION};_parse (gateway/adapters/mqtt_session.py:530);"
        "observe (prometheus_client/metrics.py:679) 1\n"
        f"{SESSION};_run_once (asyncio/base_events.py:1922) 1\n"
        "not a sample line\n"
    )
    assert stages(raw) == {
        "decode and validation": 0.6,
        "kafka batching and send": 0.2,
        "metrics": 0.1,
        "event loop and sockets": 0.1,
    }
