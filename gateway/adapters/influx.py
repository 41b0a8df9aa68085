"""InfluxDB through its v1 HTTP API (`/ping`, `/write`, `/query`), which 1.x, 2.x and 3.x serve."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import httpx

from gateway.errors import IotgwError


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

    async def write(self, db: str, lines: str, *, precision: str = "ms") -> None:
        """Write line protocol; a non-2xx answer raises IotgwError with InfluxDB's reason."""
        response = await self._send(
            "POST", "/write", params={"db": db, "precision": precision}, content=lines.encode()
        )
        if response.status_code != 204:
            raise IotgwError(
                f"InfluxDB rejected a write ({response.status_code}): {influx_reason(response)}"
            )

    async def query(self, q: str, *, db: str | None = None, method: str = "GET") -> list[Any]:
        """Run InfluxQL and return its `results`; an error in any statement raises IotgwError."""
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        response = await self._send(method, "/query", params=params)
        if response.status_code != 200:
            raise IotgwError(
                f"InfluxDB query failed ({response.status_code}): {influx_reason(response)}"
            )
        results: list[Any] = response.json().get("results", [])
        for result in results:
            if "error" in result:
                raise IotgwError(f"InfluxDB query failed: {result['error']}")
        return results

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise IotgwError(f"InfluxDB is unreachable at {self.url}: {exc}") from None


def influx_reason(response: httpx.Response) -> str:
    """InfluxDB's own explanation of a failed request, in one line."""
    try:
        return str(response.json().get("error", response.text)).strip()
    except ValueError:
        return response.text.strip() or response.reason_phrase
