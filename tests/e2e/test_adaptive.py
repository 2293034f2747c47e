"""Adaptive N on a majority-vote route: the arm's N is drawn in waves and the request stops when its
tier's rule says the vote is settled; the scripted upstream counts what was asked of it."""
from __future__ import annotations

import json

import pytest

from gateway.config import hash_key
from tests.e2e.test_front_door import upstream_cfg
from tests.support import metric_value, metrics_snapshot

KEYS = {"fixed": "key-fixed", "settled": "key-settled", "lead": "key-lead", "short": "key-short", "likely": "key-likely",
        "scored": "key-scored", "bon-only": "key-bon-only"}
ASK = [{"role": "user", "content": "What is 3 + 4?"}]


@pytest.fixture
def gw(start_gateway, scripted):
    return start_gateway({
        "upstreams": {"scripted": upstream_cfg(scripted.url)},
        "routes": [{"model": "vote", "upstream": "scripted", "aggregator": "mv", "n_max": 8,
                    "prompts": [{"id": "p0", "system": "Answer in \\boxed{}.", "params": {"max_tokens": 50}}],
                    "start": {"default": {"prompt": "p0", "n": 8}}},
                   {"model": "best", "upstream": "scripted", "aggregator": "bon", "n_max": 8,
                    "objectives": [{"name": "valid", "scorer": {"type": "json"}}],
                    "prompts": [{"id": "p0", "system": "Answer in JSON.", "params": {"max_tokens": 50}}],
                    "start": {"default": {"prompt": "p0", "n": 8}}}],
        "tiers": [{"name": "fixed"},
                  {"name": "settled", "adaptive": {"rule": "settled", "first_wave": 2, "wave": 2},
                   "caps": {"per_day": {"dollars": 10.0}}},
                  {"name": "lead", "adaptive": {"rule": "lead", "lead": 2, "first_wave": 2, "wave": 2}},
                  {"name": "likely", "adaptive": {"rule": "likely", "risk": 0.01, "first_wave": 2, "wave": 2}},
                  {"name": "scored", "adaptive": {"threshold": 0.9, "first_wave": 2, "wave": 2}},
                  {"name": "bon-only", "adaptive": {"rule": "never", "threshold": 0.9, "first_wave": 2, "wave": 2}},
                  {"name": "short", "adaptive": {"rule": "settled", "first_wave": 2, "wave": 2, "max_waves": 2}}],
        "default_tier": "fixed",
        "api_keys": [{"hash": hash_key(key), "tier": tier} for tier, key in KEYS.items()],
        "seed": 3,
    })


def ask(gw, tier: str, model: str = "vote") -> tuple[dict, dict]:
    r = gw.client(KEYS[tier]).chat.completions.with_raw_response.create(model=model, messages=ASK)
    return json.loads(r.text), dict(r.headers)


def drawn(scripted) -> list[int]:
    """Completions asked of the upstream, call by call."""
    return [rec["body"].get("n", 1) for rec in scripted.records if rec["path"].endswith("/chat/completions")]


def test_a_unanimous_vote_stops_once_the_remaining_draws_cannot_overturn_it(gw, scripted):
    scripted.script.update({"content": "It is \\boxed{7}."})
    body, headers = ask(gw, "settled")
    # 8 at most, waves of 2: after 6 unanimous votes only 2 are left, so 6 - 0 > 2 settles it
    assert drawn(scripted) == [2, 2, 2]
    assert body["iapo"]["waves"] == 3 and body["iapo"]["completions"] == 6 and body["iapo"]["n"] == 8
    assert body["iapo"]["answer"] == "7" and body["choices"][0]["message"]["content"] == "It is \\boxed{7}."
    assert headers["x-iapo-waves"] == "3" and headers["x-iapo-n"] == "8"
    row = gw.row(body["id"])
    assert (row["waves"], row["n"]) == (3, 8)
    completions = gw.rows("select cost from completions where request_id = ?", [body["id"]])
    assert len(completions) == 6
    spend = gw.spend("tier:settled")
    assert spend["dollars"] == pytest.approx(sum(c["cost"] for c in completions)) and spend["reserved"] == 0
    snap = metrics_snapshot(gw.url)
    assert metric_value(snap, "iapo_completions_saved_total", route="vote", tier="settled") == 2
    assert metric_value(snap, "iapo_request_waves_count", route="vote", tier="settled") == 1


def test_a_split_vote_draws_every_wave(gw, scripted):
    scripted.script.update({"contents": ["\\boxed{1}", "\\boxed{2}"]})  # each wave of 2 splits 1-1
    body, _ = ask(gw, "settled")
    assert drawn(scripted) == [2, 2, 2, 2]
    assert body["iapo"]["waves"] == 4 and body["iapo"]["completions"] == 8


def test_a_lead_rule_stops_as_soon_as_the_leader_is_far_enough_ahead(gw, scripted):
    scripted.script.update({"content": "\\boxed{7}"})
    body, _ = ask(gw, "lead")
    assert drawn(scripted) == [2] and body["iapo"]["completions"] == 2 and body["iapo"]["waves"] == 1


def test_a_likely_rule_stops_once_the_draws_left_would_almost_never_change_the_answer(gw, scripted):
    scripted.script.update({"content": "\\boxed{7}"})
    body, headers = ask(gw, "likely")
    # 2–0 with 6 left: the runner-up would draw level or ahead with chance 1/12 > 0.01, go on;
    # 4–0 with 4 left: 1/252 < 0.01, stop (where `settled` needs 6)
    assert drawn(scripted) == [2, 2] and body["iapo"]["completions"] == 4 and headers["x-iapo-waves"] == "2"
    assert body["iapo"]["answer"] == "7"


def test_best_of_n_stops_once_a_completion_reaches_the_threshold(gw, scripted):
    scripted.script.update({"contents": ["not json", '{"x": 1}']})  # each wave of 2 holds one valid answer
    body, headers = ask(gw, "scored", "best")
    assert drawn(scripted) == [2] and body["iapo"]["completions"] == 2 and headers["x-iapo-waves"] == "1"
    assert body["choices"][0]["message"]["content"] == '{"x": 1}' and body["iapo"]["scores"] == {"valid": 1.0}
    assert len(gw.rows("select cost from completions where request_id = ?", [body["id"]])) == 2


def test_best_of_n_below_the_threshold_draws_every_wave_and_keeps_the_best(gw, scripted):
    scripted.script.update({"content": "not json"})
    body, _ = ask(gw, "scored", "best")
    assert drawn(scripted) == [2, 2, 2, 2] and body["iapo"]["completions"] == 8 and body["iapo"]["waves"] == 4
    scripted.records.clear()
    body, _ = ask(gw, "settled", "best")  # no threshold on the tier: best-of-N draws all N at once
    assert drawn(scripted) == [8] and "waves" not in body["iapo"]


def test_rule_never_keeps_waves_for_best_of_n_only(gw, scripted):
    scripted.script.update({"contents": ["not json", '{"x": 1}']})
    body, _ = ask(gw, "bon-only", "best")
    assert drawn(scripted) == [2] and body["iapo"]["waves"] == 1
    scripted.records.clear()
    body, headers = ask(gw, "bon-only", "vote")  # majority vote on the same tier: all N at once
    assert drawn(scripted) == [8] and "waves" not in body["iapo"] and "x-iapo-waves" not in headers


def test_max_waves_draws_the_rest_in_the_last_wave(gw, scripted):
    scripted.script.update({"contents": ["\\boxed{1}", "\\boxed{2}"]})
    body, _ = ask(gw, "short")
    assert drawn(scripted) == [2, 6] and body["iapo"]["waves"] == 2


def test_a_tier_without_adaptive_draws_all_n_at_once(gw, scripted):
    scripted.script.update({"content": "\\boxed{7}"})
    body, headers = ask(gw, "fixed")
    assert drawn(scripted) == [8] and "waves" not in body["iapo"] and "x-iapo-waves" not in headers
    assert gw.row(body["id"])["waves"] is None


def test_each_wave_gets_its_own_seed(gw, scripted):
    scripted.script.update({"content": "\\boxed{7}"})
    gw.client(KEYS["settled"]).chat.completions.create(model="vote", messages=ASK, seed=5)
    seeds = [rec["body"].get("seed") for rec in scripted.records if rec["path"].endswith("/chat/completions")]
    assert seeds == [5, 7, 9]  # a seeded provider would otherwise answer every wave as it answered the first


def test_a_wave_that_fails_entirely_ends_the_request(gw, scripted):
    scripted.script.update({"error_rate": 1.0})
    r = gw.client(KEYS["settled"]).chat.completions.with_raw_response.create
    with pytest.raises(Exception):
        r(model="vote", messages=ASK)
    assert drawn(scripted) == [2]  # no second wave into a failing upstream
    assert gw.spend("tier:settled")["reserved"] == 0


def test_training_is_not_offered_adaptive_requests(gw, scripted):
    from store.database import open_database
    from store.queries import served_pulls

    scripted.script.update({"content": "\\boxed{7}"})
    adaptive, _ = ask(gw, "settled")
    fixed, _ = ask(gw, "fixed")
    gw.gateway.writer.flush()
    db = open_database(gw.db_path)
    offered = {r["id"] for r in served_pulls(db, "vote", since=0)}
    db.close()
    assert fixed["id"] in offered and adaptive["id"] not in offered
