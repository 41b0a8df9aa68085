"""InfluxDB: InfluxQL through the v1 HTTP API (`/query`), which 1.x, 2.x and 3.x serve;
writes through `/write` on 1.x and through influxdb-client (`/api/v2/write`) on 2.x, which
also has buckets, DBRP mappings and tasks (`/api/v2/...`)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import aiohttp
import httpx
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write_api_async import WriteApiAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from gateway.domain.rollups import shard_duration_s, shown_duration
from gateway.errors import IotgwError

if TYPE_CHECKING:
    from gateway.settings import Settings

__all__ = ["InfluxClient", "InfluxError", "influx_reason", "rows"]

# What a refusal of the points themselves looks like: a bad point (400; 1.x also says so
# for points outside the retention period), too large a body (413), and 2.x's 422 for
# points outside a bucket's retention. Any other answer says nothing against the points:
# a missing database or bucket (404) or a refused login (401, 403) is the setup's fault.
_REFUSALS = frozenset({400, 413, 422})


class InfluxError(IotgwError):
    """InfluxDB answered with an error (`status`), or did not answer (`status` 0)."""

    def __init__(self, message: str, status: int, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or message

    @property
    def retriable(self) -> bool:
        """No answer, 5xx, 429, a refused login or a missing database may pass; 400, 413
        and 422 refuse what was sent."""
        return self.status not in _REFUSALS


class InfluxClient:
    """An async client of one InfluxDB server; `async with` opens and closes its connections.

    With `org` and `token` it speaks 2.x: writes go to a bucket through influxdb-client,
    a "database" is a bucket with a DBRP mapping of the same name (so InfluxQL reads it),
    and health is `/health`. Without, 1.x's API with optional basic `auth`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 10.0,
        auth: tuple[str, str] | None = None,
        org: str | None = None,
        token: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.org = org
        self._token = token
        self._timeout_s = timeout_s
        headers = {"Authorization": f"Token {token}"} if token else None
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout_s, auth=auth, headers=headers
        )
        # influxdb-client's session is made on the first 2.x write, inside the event loop.
        self._v2: InfluxDBClientAsync | None = None
        self._write_api: WriteApiAsync | None = None
        self._org_id: str | None = None

    @classmethod
    def for_settings(cls, settings: Settings, *, timeout_s: float | None = None) -> InfluxClient:
        """A client of the InfluxDB `settings` name, 2.x or 1.x as they say."""
        token = settings.influx_token.get_secret_value() if settings.influx_token else None
        return cls(
            str(settings.influx_url),
            timeout_s=timeout_s or settings.timeout_s,
            auth=settings.influx_auth,
            org=settings.influx_org if token else None,
            token=token,
        )

    @property
    def v2(self) -> bool:
        return self._token is not None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        if self._v2 is not None:
            await self._v2.close()  # type: ignore[no-untyped-call]
            self._v2 = self._write_api = None

    async def ping(self) -> bool:
        """True when the server is ready: 1.x answers `/ping` with 204 (3.x with 200),
        2.x's `/health` says pass (2.x answers `/ping` before it can serve)."""
        try:
            response = await self._http.get("/health" if self.v2 else "/ping")
        except httpx.HTTPError:
            return False
        if self.v2:
            return response.status_code == 200 and _json(response).get("status") == "pass"
        return 200 <= response.status_code < 300

    async def create_database(self, name: str) -> None:
        """Create the database (2.x: the bucket and its DBRP mapping); an existing one is
        success."""
        if self.v2:
            if not await self._buckets(name):
                await self.ensure_bucket(name, retention_s=0)
            await self.ensure_dbrp(name, name, "autogen", default=True)
            return
        await self.query(f'CREATE DATABASE "{name}"', method="POST")

    async def drop_database(self, name: str) -> None:
        """Delete the database (2.x: the bucket, and with it its DBRP mappings); a missing
        one is no error."""
        if not self.v2:
            await self.query(f'DROP DATABASE "{name}"', method="POST")
            return
        for bucket in await self._buckets(name):
            await self._api("DELETE", f"/api/v2/buckets/{bucket['id']}", missing_ok=True)

    async def databases(self) -> list[str]:
        """The databases (2.x: the buckets) the login may see."""
        if self.v2:
            return [str(bucket["name"]) for bucket in await self._buckets()]
        return [str(row[0]) for row in rows(await self.query("SHOW DATABASES"))]

    async def write(self, db: str, lines: str | bytes, *, precision: str = "ms") -> None:
        """Write line protocol to database (2.x: bucket) `db`; InfluxError with InfluxDB's
        reason unless it answers 2xx."""
        body = lines.encode() if isinstance(lines, str) else lines
        if self.v2:
            await self._write_v2(db, body, precision)
            return
        response = await self._send(
            "POST", "/write", params={"db": db, "precision": precision}, content=body
        )
        _raise_unless_2xx(response, "InfluxDB rejected a write")

    async def _write_v2(self, bucket: str, body: bytes, precision: str) -> None:
        assert self._token is not None
        assert self.org is not None
        if self._write_api is None:
            self._v2 = InfluxDBClientAsync(
                self.url, token=self._token, org=self.org, timeout=int(self._timeout_s * 1000)
            )
            self._write_api = self._v2.write_api()
        try:
            await self._write_api.write(
                # influxdb-client's precisions are its strings ("ms"), typed as the class.
                bucket,
                self.org,
                body,
                write_precision=cast(WritePrecision, precision),
            )
        except ApiException as exc:
            status = int(exc.status or 0)
            reason = _api_reason(exc)
            if status == 0:
                raise InfluxError(f"InfluxDB is unreachable at {self.url}: {reason}", 0) from None
            raise InfluxError(
                f"InfluxDB rejected a write ({status}): {reason}", status, reason
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise InfluxError(f"InfluxDB is unreachable at {self.url}: {reason}", 0) from None

    # 2.x's organisation, buckets, DBRP mappings and tasks (`/api/v2`).

    async def org_id(self) -> str:
        """The id of the client's organisation; InfluxError when the token cannot see it."""
        if self._org_id is None:
            answer = await self._api("GET", "/api/v2/orgs", params={"org": self.org})
            found = answer.get("orgs") or []
            if not found:
                raise InfluxError(
                    f"InfluxDB has no organisation {self.org} that the token may read", 404
                )
            self._org_id = str(found[0]["id"])
        return self._org_id

    async def _buckets(self, name: str | None = None) -> list[dict[str, Any]]:
        params = {"orgID": await self.org_id(), "limit": "100"}
        if name is not None:
            params["name"] = name
        found: list[dict[str, Any]] = (
            await self._api("GET", "/api/v2/buckets", params=params, missing_ok=True)
        ).get("buckets", [])
        return found

    async def ensure_bucket(self, name: str, *, retention_s: int) -> str:
        """Create bucket `name` keeping data `retention_s` (0: forever), or set an existing
        one's retention: "created", "unchanged" or "was <the retention it had>"."""
        # The shard group duration must be shorter than the retention: InfluxDB's own
        # default for it, which a PATCH of the retention alone does not apply.
        rules = [
            {
                "type": "expire",
                "everySeconds": retention_s,
                "shardGroupDurationSeconds": shard_duration_s(retention_s),
            }
        ]
        found = await self._buckets(name)
        if not found:
            body = {"orgID": await self.org_id(), "name": name, "retentionRules": rules}
            try:
                await self._api("POST", "/api/v2/buckets", json=body)
            except InfluxError as exc:
                # Another client created it between the look and the create.
                if exc.status != 422 or not await self._buckets(name):
                    raise
                return "unchanged"
            return "created"
        bucket = found[0]
        current = _retention_s(bucket)
        if current == retention_s:
            return "unchanged"
        await self._api("PATCH", f"/api/v2/buckets/{bucket['id']}", json={"retentionRules": rules})
        return f"was {shown_duration(current)}"

    async def bucket_retention_s(self, name: str) -> int | None:
        """The retention of bucket `name` in seconds (0: forever), None if there is none."""
        found = await self._buckets(name)
        return _retention_s(found[0]) if found else None

    async def ensure_dbrp(self, database: str, bucket: str, rp: str, *, default: bool) -> str:
        """Map InfluxQL's `database`.`rp` onto `bucket`: "created", "updated" or
        "unchanged". (2.x shows a virtual mapping of every bucket's own name, which it
        drops as soon as a real one names that database: it does not count.)"""
        org_id = await self.org_id()
        buckets = await self._buckets(bucket)
        if not buckets:
            raise InfluxError(f"InfluxDB has no bucket {bucket} that the token may read", 404)
        bucket_id = buckets[0]["id"]
        params = {"orgID": org_id, "db": database, "rp": rp}
        found = (await self._api("GET", "/api/v2/dbrps", params=params)).get("content") or []
        real = [mapping for mapping in found if not mapping.get("virtual")]
        outcome = "created"
        for mapping in real:
            if mapping["bucketID"] == bucket_id and mapping["default"] == default:
                return "unchanged"
            await self._api("DELETE", f"/api/v2/dbrps/{mapping['id']}", params={"orgID": org_id})
            outcome = "updated"
        body = {
            "orgID": org_id, "bucketID": bucket_id, "database": database,
            "retention_policy": rp, "default": default,
        }  # fmt: skip
        await self._api("POST", "/api/v2/dbrps", json=body)
        return outcome

    async def ensure_task(self, name: str, flux: str) -> str:
        """Create task `name` running `flux`, or update it: "created", "updated" or
        "unchanged"."""
        org_id = await self.org_id()
        params = {"orgID": org_id, "name": name}
        tasks = (await self._api("GET", "/api/v2/tasks", params=params)).get("tasks") or []
        if not tasks:
            await self._api("POST", "/api/v2/tasks", json={"orgID": org_id, "flux": flux})
            return "created"
        task = tasks[0]
        if task.get("flux") == flux and task.get("status") == "active":
            return "unchanged"
        body = {"flux": flux, "status": "active"}
        await self._api("PATCH", f"/api/v2/tasks/{task['id']}", json=body)
        return "updated"

    async def task(self, name: str) -> dict[str, Any] | None:
        """Task `name` as InfluxDB describes it, or None."""
        params = {"orgID": await self.org_id(), "name": name}
        tasks = (await self._api("GET", "/api/v2/tasks", params=params)).get("tasks") or []
        return dict(tasks[0]) if tasks else None

    async def delete_task(self, name: str) -> None:
        found = await self.task(name)
        if found is not None:
            await self._api("DELETE", f"/api/v2/tasks/{found['id']}")

    async def run_flux(self, flux: str) -> None:
        """Run a Flux script for what it writes (`to()`); InfluxError with InfluxDB's
        reason."""
        params = {"orgID": await self.org_id()}
        body = {"query": flux, "type": "flux"}
        await self._api("POST", "/api/v2/query", params=params, json=body)

    async def _api(
        self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """A 2.x API call's JSON answer; InfluxError with InfluxDB's reason unless 2xx."""
        response = await self._send(method, path, **kwargs)
        if response.status_code == 404 and missing_ok:
            return {}
        _raise_unless_2xx(response, f"InfluxDB refused {method} {path}")
        return _json(response) if response.content else {}

    async def query(self, q: str, *, db: str | None = None, method: str = "GET") -> list[Any]:
        """Run InfluxQL and return its `results`; an error in any statement raises InfluxError."""
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        response = await self._send(method, "/query", params=params)
        _raise_unless_2xx(response, "InfluxDB query failed")
        results: list[Any] = _json(response).get("results", [])
        if not isinstance(results, list) or not results:
            said = " ".join(response.text.split())[:100] or "nothing"
            raise InfluxError(f"InfluxDB's /query answered no results: {said}", 0)
        for result in results:
            if "error" in result:
                raise InfluxError(f"InfluxDB query failed: {result['error']}", 200)
        return results

    async def rows(self, q: str, *, db: str | None = None) -> list[list[Any]]:
        """The rows of every series an InfluxQL query returns."""
        return rows(await self.query(q, db=db))

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise InfluxError(f"InfluxDB is unreachable at {self.url}: {reason}", 0) from None


def rows(results: list[Any]) -> list[list[Any]]:
    """The rows of every series of InfluxQL `results`, one list."""
    return [
        row
        for result in results
        for series in result.get("series", [])
        for row in series.get("values", [])
    ]


def _retention_s(bucket: dict[str, Any]) -> int:
    """A 2.x bucket's retention in seconds, as its rules say (0: forever)."""
    rules = bucket.get("retentionRules", [])
    return max((int(rule.get("everySeconds", 0)) for rule in rules), default=0)


def _raise_unless_2xx(response: httpx.Response, failed: str) -> None:
    """InfluxError saying `failed`, the status and InfluxDB's reason, unless 2xx."""
    if not 200 <= response.status_code < 300:
        reason = influx_reason(response)
        raise InfluxError(
            f"{failed} ({response.status_code}): {reason}", response.status_code, reason
        )


def influx_reason(response: httpx.Response) -> str:
    """InfluxDB's own explanation of a failed request, in one line (1.x says `error`,
    2.x `message`)."""
    body = _json(response)
    reason = body.get("error") or body.get("message") or response.text
    return " ".join(str(reason).split()) or response.reason_phrase


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _api_reason(exc: ApiException) -> str:
    """influxdb-client's ApiException as InfluxDB's one-line reason."""
    message = exc.message if isinstance(exc.message, str) else None
    if isinstance(exc.message, bytes):
        message = exc.message.decode(errors="replace")
    return " ".join(str(message or exc.reason or "no answer").split())
