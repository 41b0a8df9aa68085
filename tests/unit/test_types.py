"""User-defined device types: the types file, strict readings, JSON Schema and `iotgw types`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.cli.app import app
from gateway.domain.deadletters import Reason
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.validation import Accepted, Outcome, ReadingValidator, Rejected
from schemas import Device
from schemas.generate import render, schemas
from schemas.types import (
    BUILTIN_CATALOGUE,
    BUILTIN_TYPES,
    TypeCatalogue,
    TypesFileError,
    parse_types,
)
from tests.support import SOIL_PROBE_TYPES as SOIL_PROBE

pytestmark = pytest.mark.unit

NOW = 1_795_680_000_000
BUILTIN_NAMES = [spec.name for spec in BUILTIN_TYPES]


def soil_probe() -> TypeCatalogue:
    return parse_types(SOIL_PROBE)


def refusal(text: str) -> str:
    """The one-line reason a types file is refused for."""
    with pytest.raises(TypesFileError) as caught:
        parse_types(text)
    reason = str(caught.value)
    assert "\n" not in reason
    assert reason.startswith("types.yaml: ")
    return reason


def one_type(*metrics: str, name: str = "soil_probe") -> str:
    """A types file of one type with the metric entries given as flow mappings."""
    lines = "".join(f"      - {metric}\n" for metric in metrics)
    return f"types:\n  - name: {name}\n    metrics:\n{lines}"


# The types file


def test_types_file_gives_metrics_named_with_their_unit() -> None:
    """Each metric is its name and unit suffix, with its kind and range, after the built-ins."""
    catalogue = soil_probe()
    assert catalogue.names == [*BUILTIN_NAMES, "soil_probe"]
    spec = catalogue.get("soil_probe")
    assert spec is not None
    assert not spec.builtin
    assert [(m.name, m.kind, m.low, m.high) for m in spec.metrics] == [
        ("moisture_pct", "float", 0, 100),
        ("temperature_c", "float", -40, 85),
        ("leak", "bool", None, None),
        ("tips", "int", 0, None),
    ]
    assert [t.name for t in catalogue.user_types] == ["soil_probe"]


@pytest.mark.parametrize("text", ["", "# no types yet\n", "types: []\n"])
def test_empty_types_file_gives_the_builtin_types(text: str) -> None:
    """A types file without types is valid: the built-in types only."""
    catalogue = parse_types(text)
    assert catalogue.names == BUILTIN_NAMES
    assert catalogue.user_types == []


def test_climate_is_builtin_with_the_design_ranges() -> None:
    """DESIGN.md's sixth type: temperature, humidity, pressure 300..1100 hPa, battery."""
    climate = BUILTIN_CATALOGUE.get("climate")
    assert climate is not None
    assert climate.builtin
    assert [(m.name, m.low, m.high) for m in climate.metrics] == [
        ("temperature_c", -40, 85),
        ("humidity_pct", 0, 100),
        ("pressure_hpa", 300, 1100),
        ("battery_pct", 0, 100),
    ]


@pytest.mark.parametrize(
    ("text", "place"),
    [
        ("types:\n  - name: soil_probe\n    metrics: [\n", "not YAML (line "),
        ("kinds: []\n", "kinds"),
        ("types: 3\n", "types"),
        ("- soil_probe\n", "file"),
        ("types:\n  - metrics: [{name: a}]\n", "types.0.name"),
        ("types:\n  - name: soil_probe\n", "types.0.metrics"),
        ("types:\n  - name: soil_probe\n    metrics: []\n", "types.0.metrics"),
        ("types:\n  - name: soil_probe\n    metrics: [{name: a}]\n    colour: red\n", "colour"),
        (one_type("{name: a}", "{name: b, kind: str}"), "types.0.metrics.1.kind"),
        (one_type("{name: a, unit: '%'}"), "types.0.metrics.0.unit"),
        (one_type("{name: a, min: low}"), "types.0.metrics.0.min"),
        (one_type("{name: a, colour: red}"), "types.0.metrics.0.colour"),
        (one_type("{name: a}", name="Soil-Probe"), "'Soil-Probe'"),
        (one_type("{name: Moisture}"), "'Moisture'"),
    ],
)
def test_malformed_types_file_is_refused_in_one_line_naming_the_place(
    text: str, place: str
) -> None:
    """Not YAML, a missing or unknown field, a wrong kind, unit or name: one line, its place."""
    assert place in refusal(text)


@pytest.mark.parametrize(
    ("metrics", "problem"),
    [
        (("{name: moisture, unit: pct, min: 100, max: 0}",), "above max"),
        (("{name: leak, kind: bool, max: 1}",), "no range"),
        (("{name: moisture, unit: pct}", "{name: moisture_pct}"), "twice"),
    ],
)
def test_inconsistent_metric_is_refused_naming_its_type_and_metric(
    metrics: tuple[str, ...], problem: str
) -> None:
    """A range upside down, a bool with a range, a metric named twice: type and metric named."""
    reason = refusal(one_type(*metrics))
    assert problem in reason
    assert "soil_probe" in reason
    assert "moisture_pct" in reason or "leak" in reason


@pytest.mark.parametrize(
    "name", [*BUILTIN_NAMES, "alerts", "availability", "rejected", "iotgw_writer"]
)
def test_type_cannot_take_a_name_iotgw_uses(name: str) -> None:
    """A built-in type's name, or a measurement iotgw writes itself, is not the user's."""
    reason = refusal(one_type("{name: level, unit: pct}", name=name))
    assert name in reason


def test_type_defined_twice_is_refused_as_such() -> None:
    """Two entries of one name: the file is refused, the reason says it is the file's doing."""
    text = SOIL_PROBE + "  - name: soil_probe\n    metrics: [{name: leak, kind: bool}]\n"
    reason = refusal(text)
    assert "soil_probe" in reason
    assert "twice" in reason


@pytest.mark.parametrize("metric", ["seq", "time", "device_id", "site", "room"])
def test_metric_cannot_take_a_name_the_writer_uses(metric: str) -> None:
    """InfluxDB refuses a field named time; seq, device_id, site and room are the writer's."""
    reason = refusal(one_type(f"{{name: {metric}}}"))
    assert metric in reason


# Strict validation of a user type's readings, by the bridge's validator

REGISTRY = {"soil-1": Device(device_id="soil-1", type="soil_probe", registered_at=0)}


def judge(metrics: Any, **fields: Any) -> Outcome:
    validator = ReadingValidator(
        REGISTRY.get,
        require_registration=True,
        max_age_ms=24 * 3600 * 1000,
        limiter=RateLimiter(1.0, 1000),
        clock=lambda: 0.0,
        catalogue=soil_probe(),
    )
    reading = {"type": "soil_probe", "ts": NOW - 1000, "seq": 3, "metrics": metrics} | fields
    [outcome] = validator.process("devices/soil-1/telemetry", json.dumps(reading).encode(), NOW)
    return outcome


def test_user_type_reading_becomes_canonical_with_its_kinds() -> None:
    """A float sent as 40 is 40.0, an int stays an int, a bool a bool; a subset is enough."""
    outcome = judge({"moisture_pct": 40, "leak": False, "tips": 3})
    assert isinstance(outcome, Accepted), outcome
    record = json.loads(outcome.value)
    assert record["type"] == "soil_probe"
    assert record["metrics"] == {"moisture_pct": 40.0, "leak": False, "tips": 3}
    assert b'"moisture_pct":40.0' in outcome.value
    assert b'"tips":3,' in outcome.value or b'"tips":3}' in outcome.value


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"moisture_pct": 100.5}, "moisture_pct"),
        ({"moisture_pct": -0.1}, "moisture_pct"),
        ({"temperature_c": 86}, "temperature_c"),
        ({"tips": -1}, "tips"),
    ],
)
def test_user_type_value_out_of_range_is_a_schema_error(
    metrics: dict[str, Any], field: str
) -> None:
    """The range of the types file is enforced like a built-in one's."""
    outcome = judge(metrics)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.SCHEMA
    assert field in outcome.detail


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"moisture_pct": "40"}, "moisture_pct"),
        ({"moisture_pct": True}, "moisture_pct"),
        ({"tips": 2.5}, "tips"),
        ({"tips": True}, "tips"),
        ({"tips": "3"}, "tips"),
        ({"leak": 1}, "leak"),
        ({"leak": "true"}, "leak"),
    ],
)
def test_user_type_value_of_the_wrong_kind_is_a_schema_error(
    metrics: dict[str, Any], field: str
) -> None:
    """Strict kinds: no text for numbers, no bool for a number, no number for a bool."""
    outcome = judge(metrics)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.SCHEMA
    assert field in outcome.detail


@pytest.mark.parametrize("metric", ["humidity_pct", "moisture", "setpoint_c", "seq"])
def test_user_type_unknown_metric_is_a_schema_error(metric: str) -> None:
    """A field the type does not define, even another type's or the unit-less name, is refused."""
    outcome = judge({"moisture_pct": 40.0, metric: 1.0})
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.SCHEMA
    assert metric in outcome.detail


def test_user_type_reading_without_metrics_is_a_schema_error() -> None:
    """A reading must carry at least one metric of its type."""
    outcome = judge({})
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.SCHEMA
    assert "metrics" in outcome.detail


def test_user_type_reading_of_another_type_is_a_type_mismatch() -> None:
    """A device registered as soil_probe that sends a thermostat reading is refused."""
    outcome = judge({"temperature_c": 20.0}, type="thermostat")
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.TYPE_MISMATCH


def test_user_type_is_unknown_to_a_gateway_without_the_types_file() -> None:
    """The built-in catalogue alone does not accept a user type's reading."""
    with pytest.raises(ValueError, match="unknown device type 'soil_probe'"):
        BUILTIN_CATALOGUE.check_type("soil_probe")
    assert soil_probe().check_type("soil_probe") == "soil_probe"


# JSON Schema


def test_json_schema_holds_the_user_type_with_its_kinds_and_ranges() -> None:
    """The payload schema names the type, its metrics, their kinds and ranges, nothing else."""
    schema = soil_probe().payload.json_schema()
    reading = schema["$defs"]["SoilProbeReading"]
    assert reading["properties"]["type"]["const"] == "soil_probe"
    assert reading["additionalProperties"] is False
    metrics = schema["$defs"]["SoilProbeMetrics"]
    assert metrics["additionalProperties"] is False
    properties = metrics["properties"]
    assert list(properties) == ["moisture_pct", "temperature_c", "leak", "tips"]
    assert {"type": "number", "minimum": 0, "maximum": 100} in properties["moisture_pct"]["anyOf"]
    assert {"type": "boolean"} in properties["leak"]["anyOf"]
    assert {"type": "integer", "minimum": 0} in properties["tips"]["anyOf"]
    [single, _batch] = schema["anyOf"]
    assert single["discriminator"]["mapping"]["soil_probe"] == "#/$defs/SoilProbeReading"
    assert set(single["discriminator"]["mapping"]) == {*BUILTIN_NAMES, "soil_probe"}


# `iotgw types`


@pytest.fixture
def runner(clean_environment: None) -> CliRunner:
    """A runner in an empty folder with no IOTGW_ variables (so no types file yet)."""
    return CliRunner()


def assert_one_line_error(result: Any, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("iotgw: error: ")
    for part in parts:
        assert part in lines[0]
    assert "Traceback" not in result.output


def test_types_list_shows_builtin_and_file_types_with_kinds_and_ranges(runner: CliRunner) -> None:
    """Every type with where it is defined, each metric with its kind and range."""
    Path("types.yaml").write_text(SOIL_PROBE)
    result = runner.invoke(app, ["types", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()]
    rows = [row for row in rows if row]
    assert ["climate", "built-in", "temperature_c", "float", "-40..85"] in rows
    assert ["", "", "pressure_hpa", "float", "300..1100"] in rows
    assert ["soil_probe", "types.yaml", "moisture_pct", "float", "0..100"] in rows
    assert ["", "", "leak", "bool", ""] in rows
    assert ["", "", "tips", "int", ">= 0"] in rows
    assert [row[0] for row in rows if row[0]] == [*BUILTIN_NAMES, "soil_probe"]


def test_types_list_refuses_a_broken_types_file_in_one_line(runner: CliRunner) -> None:
    """The setting is named, with the file's problem."""
    Path("types.yaml").write_text(one_type("{name: a}", name="alerts"))
    result = runner.invoke(app, ["types", "list"])
    assert_one_line_error(result, "IOTGW_TYPES_FILE", "types.yaml", "alerts")


def test_types_validate_counts_and_names_the_types(runner: CliRunner) -> None:
    """A good file: its path, how many types, their names."""
    Path("mine.yaml").write_text(
        SOIL_PROBE + "  - name: rain_gauge\n    metrics: [{name: rain, unit: mm, min: 0}]\n"
    )
    result = runner.invoke(app, ["types", "validate", "mine.yaml"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "mine.yaml: 2 types (soil_probe, rain_gauge)"


def test_types_validate_reads_the_configured_file_by_default(runner: CliRunner) -> None:
    """Without an argument: IOTGW_TYPES_FILE; absent, the built-in types only."""
    absent = runner.invoke(app, ["types", "validate"])
    assert absent.exit_code == 0, absent.output
    assert "types.yaml: no such file; the built-in types only" in absent.stdout
    Path("custom.yaml").write_text(SOIL_PROBE)
    result = runner.invoke(app, ["types", "validate"], env={"IOTGW_TYPES_FILE": "custom.yaml"})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "custom.yaml: 1 type (soil_probe)"


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        (one_type("{name: a, kind: text}"), ("bad.yaml", "types.0.metrics.0.kind")),
        ("types: [\n", ("bad.yaml", "not YAML")),
        (one_type("{name: a}", name="thermostat"), ("bad.yaml", "thermostat")),
        (b"\xff\xfe types", ("bad.yaml", "not UTF-8")),
        (None, ("cannot read bad.yaml",)),
    ],
)
def test_types_validate_refuses_a_bad_file_with_exit_2_in_one_line(
    runner: CliRunner, content: str | bytes | None, parts: tuple[str, ...]
) -> None:
    """Wrong content, not YAML, a taken name, not text, no file: exit 2 and one line."""
    if isinstance(content, bytes):
        Path("bad.yaml").write_bytes(content)
    elif content is not None:
        Path("bad.yaml").write_text(content)
    assert_one_line_error(runner.invoke(app, ["types", "validate", "bad.yaml"]), *parts)


def test_types_schema_without_types_file_is_the_contract_file(runner: CliRunner) -> None:
    """With the built-in types only, the output is schemas/json/reading.schema.json's text."""
    result = runner.invoke(app, ["types", "schema"])
    assert result.exit_code == 0, result.output
    assert result.stdout == render(schemas()["reading.schema.json"])


def test_types_schema_holds_the_user_types(runner: CliRunner) -> None:
    """The same envelope, with the types file's types beside the built-in ones."""
    Path("types.yaml").write_text(SOIL_PROBE)
    result = runner.invoke(app, ["types", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    builtin = schemas()["reading.schema.json"]
    assert (schema["$schema"], schema["title"]) == (builtin["$schema"], builtin["title"])
    assert set(schema["$defs"]) == {*builtin["$defs"], "SoilProbeMetrics", "SoilProbeReading"}
    assert schema == json.loads(render(soil_probe().payload.json_schema() | {
        "$schema": builtin["$schema"], "title": builtin["title"],
    }))  # fmt: skip


def test_types_schema_out_writes_the_file_into_the_folder(runner: CliRunner) -> None:
    """--out DIR makes the folder if needed and writes reading.schema.json there."""
    Path("types.yaml").write_text(SOIL_PROBE)
    result = runner.invoke(app, ["types", "schema", "--out", "out/schemas"])
    assert result.exit_code == 0, result.output
    written = Path("out/schemas/reading.schema.json").read_text()
    assert "SoilProbeReading" in json.loads(written)["$defs"]
    assert written == runner.invoke(app, ["types", "schema"]).stdout
    assert "wrote out/schemas/reading.schema.json" in result.stdout


def test_types_schema_out_refuses_a_file_for_a_folder_in_one_line(runner: CliRunner) -> None:
    """A path that is a file cannot hold the schema: exit 2, one line."""
    Path("taken").write_text("")
    result = runner.invoke(app, ["types", "schema", "--out", "taken"])
    assert_one_line_error(result, "taken")
