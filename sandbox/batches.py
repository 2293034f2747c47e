"""OpenAI's Files and Batches API in memory, for the replay upstream: upload a JSONL file of requests,
create a batch over it, and after a configurable delay its output file holds one answer per line.

    POST /v1/files (multipart: file, purpose=batch)     GET /v1/files/{id}/content
    POST /v1/batches {input_file_id, endpoint, completion_window}
    GET  /v1/batches/{id}                                POST /v1/batches/{id}/cancel
    GET  /v1/batches?limit=N                              (newest first)
    POST /admin/batches {"delay_s": ..., "fail_every": k} (the delay before a batch completes; every k-th line fails)
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import time
import uuid
from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class BatchService:
    def __init__(self, answer: Callable[[dict], dict], delay_s: float = 0.5) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.fail_every = 0  # every k-th line of a batch fails (0: none), as a provider's failed requests do
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.tasks: set[asyncio.Task] = set()

    def routes(self) -> list[Route]:
        return [Route("/v1/files", self.upload, methods=["POST"]),
                Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
                Route("/v1/batches", self.create, methods=["POST"]),
                Route("/v1/batches", self.list, methods=["GET"]),
                Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
                Route("/v1/batches/{batch_id}/cancel", self.cancel, methods=["POST"]),
                Route("/admin/batches", self.configure, methods=["POST"])]

    async def upload(self, request: Request) -> Response:
        parts = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in parts or parts.get("purpose", (None, b""))[1] != b"batch":
            return _error(400, "a file with purpose 'batch' is required")
        filename, data = parts["file"]
        file_id = f"file-{uuid.uuid4().hex[:20]}"
        self.files[file_id] = data
        return JSONResponse({"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                             "filename": filename, "purpose": "batch"})

    async def content(self, request: Request) -> Response:
        data = self.files.get(request.path_params["file_id"])
        if data is None:
            return _error(404, "no such file")
        return Response(data, media_type="application/jsonl")

    async def create(self, request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        if body.get("input_file_id") not in self.files:
            return _error(400, "input_file_id names no uploaded file")
        batch_id = f"batch_{uuid.uuid4().hex[:20]}"
        lines = [line for line in self.files[body["input_file_id"]].decode().splitlines() if line.strip()]
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint", "/v1/chat/completions"),
            "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window", "24h"),
            "status": "in_progress", "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else None}
        task = asyncio.ensure_future(self._run(batch_id, lines, self.delay_s))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return JSONResponse(self.batches[batch_id])

    async def _run(self, batch_id: str, lines: list[str], delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        batch = self.batches[batch_id]
        if batch["status"] != "in_progress":
            return
        out = []
        for i, line in enumerate(lines, start=1):
            item = json.loads(line)
            try:
                if self.fail_every and i % self.fail_every == 0:
                    raise RuntimeError("the replay batch was told to fail this line")
                response = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": self.answer(item["body"])}
                batch["request_counts"]["completed"] += 1
            except Exception as exc:  # an answer that fails is that line's error, not the batch's
                response = {"status_code": 500, "body": {"error": {"message": str(exc)}}}
                batch["request_counts"]["failed"] += 1
            out.append(json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": item.get("custom_id"),
                                   "response": response, "error": None}))
        file_id = f"file-{uuid.uuid4().hex[:20]}"
        self.files[file_id] = ("\n".join(out) + "\n").encode()
        batch.update(status="completed", output_file_id=file_id, completed_at=int(time.time()))

    async def list(self, request: Request) -> Response:
        """The newest batches first, as OpenAI lists them (one page of `limit`, default 20)."""
        limit = int(request.query_params.get("limit", 20))
        page = list(reversed(self.batches.values()))[:limit]  # created in order, so newest first
        return JSONResponse({"object": "list", "data": page, "has_more": len(self.batches) > limit})

    async def retrieve(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        return JSONResponse(batch) if batch else _error(404, "no such batch")

    async def cancel(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "no such batch")
        if batch["status"] == "in_progress":
            batch["status"] = "cancelled"
        return JSONResponse(batch)

    async def configure(self, request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        if "delay_s" in body:
            self.delay_s = float(body["delay_s"])
        if "fail_every" in body:
            self.fail_every = int(body["fail_every"])
        return JSONResponse({"delay_s": self.delay_s, "fail_every": self.fail_every, "batches": len(self.batches)})


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """multipart/form-data fields: name -> (filename, bytes), read with the standard library's MIME parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": None}},
                        status_code=status)
