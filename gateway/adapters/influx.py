"""InfluxDB through its v1 HTTP API (`/ping`, `/write`, `/query`), which 1.x, 2.x and 3.x serve."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

from gateway.errors import IotgwError

__all__ = ["InfluxClient", "InfluxError", "influx_reason", "rows"]


class InfluxError(IotgwError):
    """InfluxDB answered with an error (`status`), or did not answer (`status` 0)."""

    def __init__(self, message: str, status: int, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or message

    @property
    def retriable(self) -> bool:
        """No answer, 5xx or 429 may pass; any other 4xx is a refusal of what was sent."""
        return self.status == 0 or self.status >= 500 or self.status == 429


class InfluxClient:
    """An async client of one InfluxDB server; `async with` opens and closes its connections."""

    def __init__(
        self, url: str, *, timeout_s: float = 10.0, auth: tuple[str, str] | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, auth=auth)

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

    async def ping(self) -> bool:
        """True when the server answers `/ping` with 204."""
        try:
            response = await self._http.get("/ping")
        except httpx.HTTPError:
            return False
        return response.status_code == 204

    async def create_database(self, name: str) -> None:
        """Create the database; InfluxDB treats an existing one as success."""
        await self.query(f'CREATE DATABASE "{name}"', method="POST")

    async def databases(self) -> list[str]:
        """The databases the login may see."""
        return [str(row[0]) for row in rows(await self.query("SHOW DATABASES"))]

    async def write(self, db: str, lines: str | bytes, *, precision: str = "ms") -> None:
        """Write line protocol; InfluxError with InfluxDB's reason unless it answers 2xx."""
        body = lines.encode() if isinstance(lines, str) else lines
        response = await self._send(
            "POST", "/write", params={"db": db, "precision": precision}, content=body
        )
        if not 200 <= response.status_code < 300:
            reason = influx_reason(response)
            raise InfluxError(
                f"InfluxDB rejected a write ({response.status_code}): {reason}",
                response.status_code,
                reason,
            )

    async def query(self, q: str, *, db: str | None = None, method: str = "GET") -> list[Any]:
        """Run InfluxQL and return its `results`; an error in any statement raises InfluxError."""
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        response = await self._send(method, "/query", params=params)
        if response.status_code != 200:
            reason = influx_reason(response)
            raise InfluxError(
                f"InfluxDB query failed ({response.status_code}): {reason}",
                response.status_code,
                reason,
            )
        results: list[Any] = response.json().get("results", [])
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


def influx_reason(response: httpx.Response) -> str:
    """InfluxDB's own explanation of a failed request, in one line."""
    try:
        return str(response.json().get("error", response.text)).strip()
    except ValueError:
        return response.text.strip() or response.reason_phrase
