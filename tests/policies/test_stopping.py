"""Sequential majority-vote arms: the exact walk against brute-force enumeration of every draw sequence."""
import numpy as np
import pytest

from policies.environments import mv_vote_credit
from policies.pooled import plugin_vote_credit
from policies.stopping import (StoppingRule, Waves, best_sequential, brute_force_mv, learned_rules, overturn_chance,
                               sequential_mv, sequential_mv_caps, settled)

RULES = [StoppingRule("never"), StoppingRule("settled"), StoppingRule("likely", risk=0.05), StoppingRule("likely", risk=0.3),
         StoppingRule("lead", lead=1), StoppingRule("lead", lead=2)]
WAVES = [Waves(1, 1), Waves(2, 3), Waves(4, 2), Waves(9, 1), Waves(1, 1, max_waves=3), Waves(2, 1, max_waves=1)]


@pytest.fixture
def queries():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(3, 0.7), size=5)
    probs[0] = [1.0, 0.0, 0.0]  # a query every draw answers the same way
    probs[1] = [0.5, 0.5, 0.0]  # an even split: ties are common
    return probs, rng.integers(0, 3, size=5)


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("waves", WAVES, ids=str)
@pytest.mark.parametrize("n_max", [1, 2, 5, 7])
def test_exact_value_matches_brute_force(queries, rule, waves, n_max):
    probs, gold = queries
    value = sequential_mv(probs, gold, n_max, waves, rule)
    brute = np.array([brute_force_mv(probs[i], int(gold[i]), n_max, waves, rule) for i in range(len(gold))])
    np.testing.assert_allclose(value.credit, brute[:, 0], atol=1e-12)
    np.testing.assert_allclose(value.completions, brute[:, 1], atol=1e-12)
    np.testing.assert_allclose(value.waves, brute[:, 2], atol=1e-12)


def test_settled_keeps_the_fixed_arms_credit_for_fewer_completions(queries):
    probs, gold = queries
    fixed = mv_vote_credit(probs, gold, 9)[:, 8]
    value = sequential_mv(probs, gold, 9, Waves(1, 1), StoppingRule("settled"))
    np.testing.assert_allclose(value.credit, fixed, atol=1e-12)
    assert value.completions[0] == pytest.approx(5.0)  # unanimous: settled once 5 of 9 agree
    assert np.all(value.completions <= 9) and value.completions.mean() < 9


def test_one_walk_values_every_cap_as_separate_walks_do(queries):
    probs, gold = queries
    rule, waves = StoppingRule("lead", lead=2), Waves(2, 2)
    together = sequential_mv_caps(probs, gold, [3, 4, 8], waves, rule)
    for cap in (3, 4, 8):
        alone = sequential_mv(probs, gold, cap, waves, rule)
        np.testing.assert_allclose(together[cap].credit, alone.credit, atol=1e-12)
        np.testing.assert_allclose(together[cap].completions, alone.completions, atol=1e-12)
        np.testing.assert_allclose(together[cap].waves, alone.waves, atol=1e-12)


def test_never_is_one_wave_of_n_max(queries):
    probs, gold = queries
    value = sequential_mv(probs, gold, 6, Waves(2, 2), StoppingRule("never"))
    np.testing.assert_allclose(value.completions, 6.0)
    np.testing.assert_allclose(value.waves, 3.0)
    with pytest.raises(ValueError):
        StoppingRule("lead", lead=0)
    with pytest.raises(ValueError):
        sequential_mv_caps(probs, gold, [3, 5], Waves(), StoppingRule("settled"))


def test_servings_check_reads_the_votes_so_far():
    rule = StoppingRule("settled")
    assert settled(["a", "a", "a"], 3, 5, rule)  # 3 - 0 > 2 left
    assert not settled(["a", "a", "b"], 3, 5, rule)  # 2 - 1 = 1, 2 left: b could still win
    assert not settled(["a", None, None], 3, 5, rule)  # failures use draws up but do not vote
    assert settled(["a", "b"], 5, 5, rule)  # N_max reached
    assert settled(["x", "x", "y", "x"], 4, 16, StoppingRule("lead", lead=2))
    assert not settled([None, None], 2, 8, StoppingRule("lead", lead=1))
    assert list(Waves(2, 3, max_waves=3).ends(20)) == [2, 5, 20]


@pytest.mark.parametrize("rule", RULES, ids=str)
@pytest.mark.parametrize("waves", WAVES[:3], ids=str)
def test_a_class_that_abstains_matches_brute_force(queries, rule, waves):
    probs, gold = queries  # the last class is "no answer"
    gold = np.minimum(gold, 1)
    value = sequential_mv(probs, gold, 6, waves, rule, abstain=True)
    brute = np.array([brute_force_mv(probs[i], int(gold[i]), 6, waves, rule, abstain=True) for i in range(len(gold))])
    np.testing.assert_allclose(value.credit, brute[:, 0], atol=1e-12)
    np.testing.assert_allclose(value.completions, brute[:, 1], atol=1e-12)


def test_abstaining_draws_are_valued_as_the_pooled_estimates_value_missing_answers():
    counts = np.array([[5, 2, 1], [1, 3, 0], [0, 0, 2]])  # gold in column 0
    missing = np.array([2, 4, 1])
    probs = np.column_stack([counts, missing]) / (counts.sum(1) + missing)[:, None]
    for n in (1, 4, 7):
        walked = sequential_mv(probs, np.zeros(3, dtype=int), n, Waves(n, 1), StoppingRule("never"), abstain=True)
        np.testing.assert_allclose(walked.credit, plugin_vote_credit(counts, missing, n)[:, n - 1], atol=1e-12)


def test_a_tier_takes_a_sequential_arm_only_when_it_is_worth_it():
    rng = np.random.default_rng(3)
    easy = np.column_stack([rng.integers(7, 9, 40), rng.integers(0, 2, 40), np.zeros(40)])  # mostly unanimous
    none = np.zeros(40)
    free = best_sequential(easy, none, cost=0.01, weight=0.0, n=16, n_limit=16, waves=Waves(2, 2))
    assert free is not None and free.completions < 16  # at λ = 0, `settled` ties the fixed arm for less
    fixed = plugin_vote_credit(easy.astype(int), none.astype(int), 16)[:, 15].mean()
    assert free.credit >= fixed - 1e-5 - 1e-9
    paying = best_sequential(easy, none, cost=0.01, weight=5.0, n=8, n_limit=16, waves=Waves(2, 2))
    assert paying is not None and paying.completions < 8
    assert paying.utility >= plugin_vote_credit(easy.astype(int), none.astype(int), 8)[:, 7].mean() - 5.0 * 0.01 * 8
    # when completions are dear, one draw (the fixed arm, N = 1) beats every arm that may draw more
    assert best_sequential(easy, none, cost=0.01, weight=1000.0, n=1, n_limit=16, waves=Waves(1, 1)) is None


def test_overturn_chance_is_the_beta_binomial_tail_integrated_over_the_runner_ups_share():
    """The table against a direct numerical integral: q ~ Beta(second + 1, top + 1) on a fine grid, and
    the binomial chance that the runner-up ends level (half) or ahead after r more draws."""
    from math import comb
    q = (np.arange(200_000) + 0.5) / 200_000
    for top, second, left in [(3, 1, 4), (5, 2, 7), (2, 2, 3), (6, 0, 6), (4, 3, 1), (1, 0, 12), (7, 1, 0)]:
        density = q ** second * (1 - q) ** top
        density /= density.sum()
        direct = 0.0
        for j in range(left + 1):
            margin = (second + j) - (top + left - j)
            if margin >= 0:
                direct += (0.5 if margin == 0 else 1.0) * comb(left, j) * np.sum(density * q ** j * (1 - q) ** (left - j))
        assert overturn_chance(top, second, left) == pytest.approx(direct, abs=1e-6), (top, second, left)
    states = np.array([[3, 1], [5, 2], [2, 2]])  # vectorised over states, as the exact walk calls it
    np.testing.assert_allclose(overturn_chance(states[:, 0], states[:, 1], 4),
                               [overturn_chance(t, s, 4) for t, s in states], atol=1e-15)


def test_likely_sits_between_settled_and_never_stopping_early():
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.full(4, 0.5), size=60)
    gold = rng.integers(0, 4, size=60)
    fixed = mv_vote_credit(probs, gold, 21)[:, 20]
    settled_value = sequential_mv(probs, gold, 21, Waves(1, 1), StoppingRule("settled"))
    previous = settled_value.completions.mean()
    for risk in (1e-6, 1e-3, 0.05, 0.3):  # a larger risk stops sooner and strays further from the fixed vote
        value = sequential_mv(probs, gold, 21, Waves(1, 1), StoppingRule("likely", risk=risk))
        assert value.completions.mean() <= previous + 1e-12
        previous = value.completions.mean()
        if risk <= 1e-3:
            assert abs(value.credit.mean() - fixed.mean()) < 5 * risk + 1e-9
    assert previous < settled_value.completions.mean() - 1
    assert StoppingRule.parse(str(StoppingRule("likely", risk=0.001))) == StoppingRule("likely", risk=0.001)
    with pytest.raises(ValueError):
        StoppingRule("likely", risk=0.0)
    assert settled(["a"] * 5 + ["b"], 6, 32, StoppingRule("likely", risk=0.01)) is False  # 5–1 with 26 left: open
    assert settled(["a"] * 14 + ["b"], 15, 32, StoppingRule("likely", risk=0.01)) is True  # 14–1 with 17 left


def test_a_tolerance_lets_a_free_tier_take_a_rule_that_almost_never_changes_the_answer():
    rng = np.random.default_rng(5)
    counts = np.column_stack([rng.integers(5, 9, 80), rng.integers(0, 4, 80), rng.integers(0, 2, 80)])
    none = np.zeros(80)
    exact = best_sequential(counts, none, cost=0.01, weight=0.0, n=32, n_limit=32, waves=Waves(1, 1))
    loose = best_sequential(counts, none, cost=0.01, weight=0.0, n=32, n_limit=32, waves=Waves(1, 1), tolerance=1e-4)
    assert exact.rule == StoppingRule("settled")
    assert loose.completions < exact.completions
    assert loose.credit >= exact.credit - 1e-4 - 1e-9
    custom = best_sequential(counts, none, cost=0.01, weight=0.0, n=32, n_limit=32, waves=Waves(1, 1),
                             rules=learned_rules(risk=0.01), tolerance=1e-4)
    assert custom.rule in (StoppingRule("likely", risk=0.01), StoppingRule("settled"))
    for weight in (0.0, 0.5, 5.0):  # a chosen arm always stops early on some path: never a fixed arm in disguise
        choice = best_sequential(counts, none, cost=0.01, weight=weight, n=8, n_limit=32, waves=Waves(2, 2))
        assert choice is None or choice.completions < choice.n_max
    assert StoppingRule.parse(str(StoppingRule("likely", risk=1.2345678e-3))).risk == 1.2345678e-3
    with pytest.raises(ValueError, match="between 0 and 1"):
        StoppingRule.parse("likely0")


@pytest.mark.parametrize("waves", [Waves(1, 1), Waves(2, 2), Waves(3, 1), Waves(1, 2, max_waves=2), Waves(5, 1)], ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.55, 0.8, 2.0])
def test_best_of_n_waves_match_brute_force(waves, threshold):
    rng = np.random.default_rng(2)
    values = np.round(rng.random((4, 3)), 2)
    values[0] = [0.3, 0.55, 0.55]  # outcomes with equal values, one exactly at a threshold
    probs = rng.dirichlet(np.ones(3), size=4)
    from policies.stopping import brute_force_bon, sequential_bon
    value = sequential_bon(values, probs, 5, waves, threshold)
    brute = np.array([brute_force_bon(values[i], probs[i], 5, waves, threshold) for i in range(4)])
    np.testing.assert_allclose(value.credit, brute[:, 0], atol=1e-12)
    np.testing.assert_allclose(value.completions, brute[:, 1], atol=1e-12)
    np.testing.assert_allclose(value.waves, brute[:, 2], atol=1e-12)
    if threshold > 1:  # never reached: the fixed arm's expected best of 5, all 5 drawn
        cdf_sorted = [np.cumsum(p[np.argsort(v)]) for v, p in zip(values, probs)]
        fixed = [np.sum(np.sort(v) * (c ** 5 - np.concatenate([[0], c[:-1]]) ** 5)) for v, c in zip(values, cdf_sorted)]
        np.testing.assert_allclose(value.credit, fixed, atol=1e-12)
        np.testing.assert_allclose(value.completions, 5.0)
