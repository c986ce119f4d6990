"""Deficit round robin across tenants, in plain Python (streams/fairness.py).

The same scenarios run against the Lua script in tests/store/test_fairness.py, which also
checks that script and this model pick the same sequence.
"""

from __future__ import annotations

from collections import Counter

from streams.fairness import DeficitRoundRobin, quantum


def queued(**backlog: tuple[int, int]) -> DeficitRoundRobin:
    """Tenants pushed in the order given: name=(runs, weight); run ids are NAME-INDEX."""
    drr = DeficitRoundRobin()
    for tenant, (runs, weight) in backlog.items():
        for index in range(runs):
            drr.push(tenant, f"{tenant}-{index}", weight)
    return drr


def tenants_of(picks: list[str | None]) -> str:
    return "".join((pick or "-")[0] for pick in picks)


def drain(drr: DeficitRoundRobin, limit: int = 10_000) -> list[str | None]:
    picks: list[str | None] = []
    while len(picks) < limit:
        pick = drr.pick()
        if pick is None:
            break
        picks.append(pick)
    return picks


def test_a_flood_does_not_starve_a_tenant_that_sends_little() -> None:
    drr = queued(a=(100, 1), b=(5, 1))
    picks = drain(drr)
    assert len(picks) == 105
    b_positions = [index for index, pick in enumerate(picks) if pick and pick.startswith("b")]
    assert b_positions == [1, 3, 5, 7, 9]  # every second pick until B has nothing left
    assert tenants_of(picks[:10]) == "ababababab"
    assert set(tenants_of(picks[10:])) == {"a"}


def test_each_tenant_is_served_in_its_own_order() -> None:
    picks = drain(queued(a=(20, 2), b=(7, 1)))
    for tenant, count in (("a", 20), ("b", 7)):
        mine = [pick for pick in picks if pick and pick.startswith(tenant)]
        assert mine == [f"{tenant}-{index}" for index in range(count)]


def test_weights_give_picks_in_proportion() -> None:
    drr = queued(a=(300, 3), b=(300, 1))
    picks = drain(drr, limit=400)
    assert tenants_of(picks[:8]) == "aaabaaab"
    assert Counter(tenants_of(picks)) == {"a": 300, "b": 100}


def test_three_tenants_share_by_weight() -> None:
    drr = queued(a=(1000, 1), b=(1000, 2), c=(1000, 5))
    counts = Counter(tenants_of(drain(drr, limit=800)))
    assert counts == {"a": 100, "b": 200, "c": 500}


def test_a_tenant_that_empties_leaves_and_forfeits_its_turn() -> None:
    drr = queued(a=(1, 3), b=(4, 1))
    assert drr.pick() == "a-0"  # a had 3 picks this turn but only one run
    assert list(drr.ring) == ["b"]
    assert "a" not in drr.deficits
    drr.push("a", "a-1", 3)  # back with new work: it joins at the tail, a fresh turn
    assert tenants_of(drain(drr)) == "bab" + "bb"


def test_a_newcomer_waits_at_most_one_turn_of_each_tenant_ahead() -> None:
    drr = queued(a=(50, 4), b=(50, 2))
    assert tenants_of([drr.pick()]) == "a"
    drr.push("c", "c-0", 1)
    # a finishes its turn (3 more), b takes its 2, then c.
    assert tenants_of([drr.pick() for _ in range(6)]) == "aaabbc"


def test_weight_zero_or_junk_counts_as_one() -> None:
    assert [quantum(value) for value in (0, None, "x", 1, "3", 7)] == [1, 1, 1, 1, 3, 7]
    drr = queued(a=(4, 0), b=(4, 1))
    assert tenants_of(drain(drr)) == "abababab"


def test_weight_changes_apply_from_the_next_turn() -> None:
    drr = queued(a=(100, 1), b=(100, 1))
    assert tenants_of([drr.pick() for _ in range(2)]) == "ab"
    drr.push("a", "a-new", 2)
    assert tenants_of([drr.pick() for _ in range(6)]) == "aabaab"


def test_nothing_queued_picks_nothing() -> None:
    drr = DeficitRoundRobin()
    assert drr.pick() is None
    drr.push("a", "a-0")
    assert drr.pick() == "a-0"
    assert drr.pick() is None
    assert not drr.ring and not drr.deficits
