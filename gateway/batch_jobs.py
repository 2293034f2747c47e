"""Exploration at batch prices: a round of pulls as one provider batch job (OpenAI's Files and Batches
API: a JSONL file of requests, a batch over it, an output file of answers), on an OpenAI-compatible
upstream. Providers charge batch jobs about half, and nobody waits for exploration."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from gateway.transports import UpstreamError, kind_of_status
from gateway.upstream import UpstreamClient

FINAL = ("completed", "failed", "expired", "cancelled")


class BatchUnsupported(Exception):
    """The upstream cannot take batch jobs through this gateway (it is not OpenAI-compatible)."""


class BatchClient:
    def __init__(self, upstream: UpstreamClient) -> None:
        if not upstream.config.direct:
            raise BatchUnsupported(f"upstream {upstream.name!r} goes through litellm: batch exploration needs an "
                                   "OpenAI-compatible upstream (transport openai, or auto with an openai/... model)")
        self.upstream = upstream
        self.base = upstream.config.base_url()
        key = upstream.config.api_key()
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "BatchClient":
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def _json(self, method: str, path: str, **kwargs) -> dict:
        data = await self._bytes(method, path, **kwargs)
        try:
            return json.loads(data)
        except ValueError:
            raise UpstreamError("bad_response", f"batch API {path} answered something that is not JSON") from None

    async def _bytes(self, method: str, path: str, **kwargs) -> bytes:
        """The answer's body; every failure (status, timeout, connection) as an UpstreamError."""
        try:
            async with self.session.request(method, self.base + path, headers=self.headers,
                                            timeout=aiohttp.ClientTimeout(total=self.upstream.config.timeout),
                                            **kwargs) as r:
                data = await r.read()
                if r.status >= 400:
                    raise UpstreamError(kind_of_status(r.status), f"batch API {path} answered {r.status}: "
                                                                  f"{data[:200].decode('utf-8', 'replace')}", r.status)
                return data
        except asyncio.TimeoutError:
            raise UpstreamError("timeout", f"batch API {path} timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError("connection", f"batch API {path}: {exc!r}") from None

    async def submit(self, requests: list[tuple[str, dict]], metadata: dict[str, str] | None = None) -> str:
        """Upload the requests (custom id, chat body) as one JSONL file and start a batch over it, tagged
        with `metadata` (so a batch whose id was never recorded can be found again)."""
        lines = "\n".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
                          for cid, body in requests) + "\n"
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", lines.encode(), filename="iapo-explore.jsonl", content_type="application/jsonl")
        uploaded = await self._json("POST", "/files", data=form)
        batch = await self._json("POST", "/batches", json={"input_file_id": _id_of(uploaded, "/files"),
                                                           "endpoint": "/v1/chat/completions",
                                                           "completion_window": "24h",
                                                           **({"metadata": metadata} if metadata else {})})
        return _id_of(batch, "/batches")

    async def find(self, metadata: dict[str, str]) -> str | None:
        """The newest live or completed batch among the provider's last 100 tagged with `metadata`."""
        listed = await self._json("GET", "/batches", params={"limit": "100"})
        for batch in listed.get("data") or [] if isinstance(listed, dict) else []:
            if isinstance(batch, dict) and batch.get("metadata") == metadata and \
                    batch.get("status") not in ("failed", "expired", "cancelled") and isinstance(batch.get("id"), str):
                return batch["id"]
        return None

    async def status(self, batch_id: str) -> dict:
        return await self._json("GET", f"/batches/{batch_id}")

    async def wait(self, batch_id: str, *, poll_s: float, timeout_s: float) -> dict:
        """The batch once it is final, or as it stands when `timeout_s` runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            batch = await self.status(batch_id)
            if batch.get("status") in FINAL or time.monotonic() >= deadline:
                return batch
            await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    async def results(self, batch: dict) -> dict[str, dict]:
        """custom id -> the answer's body (a chat.completion), or {"error": ...} for a line that failed."""
        if not batch.get("output_file_id"):
            return {}
        text = (await self._bytes("GET", f"/files/{batch['output_file_id']}/content")).decode("utf-8", "replace")
        out = {}
        for line in text.splitlines():
            try:
                item = json.loads(line) if line.strip() else None
            except ValueError:
                item = None
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                continue  # a line we cannot read: its pull counts as missing and is bought again
            response = item.get("response") if isinstance(item.get("response"), dict) else {}
            out[item["custom_id"]] = response.get("body") if response.get("status_code") == 200 else \
                {"error": item.get("error") or response.get("body")}
        return out


def _id_of(answer: dict, path: str) -> str:
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
        raise UpstreamError("bad_response", f"batch API {path} answered without an id")
    return answer["id"]
