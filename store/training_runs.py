"""Training runs kept in the store: what a run is (route, settings fingerprint, its queries), how far it
got, and the exploration pulls it already paid for, so a killed run resumes instead of buying them again."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from store.database import Database, write_transaction


@dataclass
class TrainingRun:
    run_id: str
    route: str
    status: str  # running | published | partial | unpublished | aborted | abandoned
    started: float
    fingerprint: str
    budget: int
    queries: list[dict]
    spent: int = 0
    dollars: float = 0.0
    finished: float | None = None
    report: dict | None = None


@dataclass(frozen=True)
class LoggedPull:
    """An exploration pull already in the log: which arm on which query, and its completions' outcomes."""

    prompt_id: str
    n: int
    query_key: str
    answers: list[str | None]
    scores: list[list[float] | None]
    costs: list[float]
    errors: int


class TrainingRuns:
    def __init__(self, db: Database) -> None:
        self.db = db

    def unfinished(self, route: str) -> TrainingRun | None:
        """The newest run of `route` that neither finished nor was abandoned: killed (still marked running;
        the caller holds the route's lock, so its process is gone), aborted by an upstream failure, or
        waiting for a batch job."""
        rows = self.db.query("select * from training_runs where route = ? order by started desc limit 1", [route])
        return _run(rows[0]) if rows and rows[0]["status"] in ("running", "aborted", "waiting") else None

    def get(self, run_id: str) -> TrainingRun | None:
        rows = self.db.query("select * from training_runs where run_id = ?", [run_id])
        return _run(rows[0]) if rows else None

    def list(self, route: str | None = None, limit: int = 50) -> list[TrainingRun]:
        where, params = ("where route = ?", [route]) if route else ("", [])
        return [_run(r) for r in self.db.query(f"select * from training_runs {where} order by started desc limit ?",
                                                [*params, limit])]

    def begin(self, run: TrainingRun) -> None:
        with write_transaction(self.db):
            self.db.insert("training_runs", [{
                "run_id": run.run_id, "route": run.route, "status": "running", "started": run.started,
                "fingerprint": run.fingerprint, "budget": run.budget, "spent": 0, "dollars": 0.0,
                "queries": json.dumps(run.queries, ensure_ascii=False), "finished": None, "report": None}])

    def progress(self, run_id: str, spent: int, dollars: float) -> None:
        with write_transaction(self.db):
            self.db.execute("update training_runs set spent = ?, dollars = ? where run_id = ?", [spent, dollars, run_id])

    def finish(self, run_id: str, status: str, report: dict | None = None) -> None:
        with write_transaction(self.db):
            self.db.execute("update training_runs set status = ?, finished = ?, report = ? where run_id = ?",
                            [status, time.time(), json.dumps(report, default=str) if report else None, run_id])

    def logged_pulls(self, run_id: str) -> dict[int, LoggedPull]:
        """The run's pulls in the log, by their position in the run."""
        requests = {r["id"]: r for r in self.db.query(
            "select id, run_pull, prompt_id, n, query_key from requests where run_id = ? and run_pull is not null",
            [run_id])}
        rows: dict[str, list[dict]] = {rid: [] for rid in requests}
        for c in self.db.query("select c.request_id, c.answer, c.scores, c.cost, c.error from completions c"
                               " join requests r on r.id = c.request_id where r.run_id = ? and r.run_pull is not null"
                               " order by c.request_id, c.idx", [run_id]):
            rows[c["request_id"]].append(c)
        return {r["run_pull"]: LoggedPull(
            r["prompt_id"], int(r["n"]), r["query_key"], [c["answer"] for c in rows[rid]],
            [json.loads(c["scores"]) if c["scores"] else None for c in rows[rid]],
            [c["cost"] or 0.0 for c in rows[rid]], sum(1 for c in rows[rid] if c["error"]))
            for rid, r in requests.items()}


class TrainingBatches:
    """The provider batch job of each round of a batch-mode run: a run that exits while a batch is out
    picks that batch up again instead of submitting the round twice."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def of(self, run_id: str, round_no: int) -> dict | None:
        rows = self.db.query("select * from training_batches where run_id = ? and round = ?", [run_id, round_no])
        return rows[0] if rows else None

    def list(self, run_id: str) -> list[dict]:
        return self.db.query("select * from training_batches where run_id = ? order by round", [run_id])

    def submitted(self, run_id: str, round_no: int, batch_id: str, requests: int) -> None:
        with write_transaction(self.db):
            self.db.insert("training_batches", [{"run_id": run_id, "round": round_no, "batch_id": batch_id,
                                                 "status": "submitted", "submitted": time.time(), "completed": None,
                                                 "requests": requests}], upsert=("run_id", "round"))

    def status(self, run_id: str, round_no: int, status: str) -> None:
        with write_transaction(self.db):
            self.db.execute("update training_batches set status = ?, completed = ? where run_id = ? and round = ?",
                            [status, time.time() if status == "completed" else None, run_id, round_no])


def _run(row: dict) -> TrainingRun:
    return TrainingRun(row["run_id"], row["route"], row["status"], row["started"], row["fingerprint"], row["budget"],
                       json.loads(row["queries"] or "[]"), row["spent"] or 0, row["dollars"] or 0.0, row["finished"],
                       json.loads(row["report"]) if row["report"] else None)
