"""bench/family.py: what the engine is told about the training set's query slots."""
from __future__ import annotations

import pytest

from bench.family import SlotsHidden
from policies.psst import PSST, Context

ARGS = dict(prompts=["a", "b"], n_max=8, contexts={"only": Context((1.0,), 0.0)}, budget=200, seed=0)


def test_slots_hidden_keeps_the_count_or_nothing():
    keys = [f"q{x}" for x in range(30)]
    counted = SlotsHidden(PSST, keep="count")(query_keys=keys, **ARGS)
    assert counted.n_queries == 30 and not counted._slot_of  # paired slots, no keys to revisit by
    assert [(p, n, pull.query) for pull in counted.ask() for p, n in [pull]] == \
        [(p, n, pull.query) for pull in PSST(n_queries=30, **ARGS).ask() for p, n in [pull]]
    hidden = SlotsHidden(PSST, keep="none", estimator="block")(query_keys=keys, n_queries=30, **ARGS)
    assert hidden.n_queries is None and all(pull.query is None for pull in hidden.ask())
    with pytest.raises(ValueError, match="keep"):
        SlotsHidden(PSST, keep="counts")
