"""Temperature sampling, schedules and the integer allocation, without Beam."""

from __future__ import annotations

import numpy as np
import pytest

from winnow.selectors.mixing import (
    SchedulePoint,
    allocate,
    cap_epochs,
    expected_counts,
    plan_mix,
    sampling_probabilities,
    shard_sizes,
    tau_at,
)

COOLDOWN = [SchedulePoint(0.0, 5.0), SchedulePoint(0.5, 1.0)]


def test_probabilities_exact_values():
    np.testing.assert_allclose(sampling_probabilities([900, 100], 1.0), [0.9, 0.1])
    np.testing.assert_allclose(sampling_probabilities([900, 100], 2.0), [30 / 40, 10 / 40])
    np.testing.assert_allclose(sampling_probabilities([4, 1, 0], 0.5), [16 / 17, 1 / 17, 0.0])


def test_tau_one_is_proportional_and_large_tau_approaches_uniform():
    sizes = np.array([63956, 13869, 34])
    np.testing.assert_allclose(sampling_probabilities(sizes, 1.0), sizes / sizes.sum())
    np.testing.assert_allclose(sampling_probabilities(sizes, 1e6), [1 / 3] * 3, atol=1e-5)
    assert sampling_probabilities(sizes, 5.0)[2] > sampling_probabilities(sizes, 1.0)[2]


def test_probabilities_reject_non_positive_tau():
    with pytest.raises(ValueError, match="positive"):
        sampling_probabilities([1, 2], 0)


def test_step_and_linear_schedules():
    assert tau_at(COOLDOWN, 0.0) == 5.0
    assert tau_at(COOLDOWN, 0.4999) == 5.0
    assert tau_at(COOLDOWN, 0.5) == 1.0
    assert tau_at(COOLDOWN, 0.75, "linear") == 1.0
    assert tau_at([SchedulePoint(0.0, 5.0), SchedulePoint(1.0, 1.0)], 0.25, "linear") == 4.0


def test_shard_sizes_split_exactly():
    assert shard_sizes(10, 3).tolist() == [3, 3, 4]
    assert shard_sizes(7, 7).tolist() == [1] * 7


def test_step_schedule_switches_exactly_at_the_fraction():
    sizes = [900, 100]
    expected = expected_counts(sizes, [SchedulePoint(0.0, 2.0), SchedulePoint(0.3, 1.0)], total=10, shards=2)
    # positions 0..2 use tau 2 (p = 0.75/0.25), positions 3..4 tau 1 (0.9/0.1); shard 2 is all tau 1
    np.testing.assert_allclose(expected[0], [3 * 0.75 + 2 * 0.9, 3 * 0.25 + 2 * 0.1])
    np.testing.assert_allclose(expected[1], [5 * 0.9, 5 * 0.1])


def test_allocation_sums_per_shard_and_stays_close_per_source():
    sizes = {"en": 63956, "da": 50229, "vi": 34, "tr": 34, "de": 13869}
    total, shards = sum(sizes.values()), 37
    plan = plan_mix(sizes, COOLDOWN, total, shards)
    assert plan.counts.sum(axis=1).tolist() == shard_sizes(total, shards).tolist()
    assert plan.counts.sum() == total
    running_error = np.abs(np.cumsum(plan.counts, axis=0) - np.cumsum(plan.expected, axis=0))
    assert running_error.max() < 1.0 + 1e-9
    assert (plan.counts >= 0).all()


def test_allocation_is_deterministic():
    sizes = {"a": 1000, "b": 10, "c": 333}
    first = plan_mix(sizes, COOLDOWN, 1343, 9)
    second = plan_mix(dict(reversed(list(sizes.items()))), COOLDOWN, 1343, 9)
    np.testing.assert_array_equal(first.counts, second.counts)
    assert first.sources == ["a", "b", "c"]


def test_small_source_is_repeated_across_shards():
    plan = plan_mix({"big": 1000, "tiny": 5}, [SchedulePoint(0.0, 100.0)], total=1005, shards=5)
    tiny = plan.counts[:, plan.sources.index("tiny")]
    assert tiny.sum() > 5 * 50, "near-uniform sampling draws the tiny source about half the time"
    assert (tiny > 5).all(), "a source smaller than one shard's share repeats inside every shard"
    assert plan.shard_of_slot(1, np.array([0, int(tiny[0]) - 1, int(tiny[0])])).tolist() == [0, 0, 1]


def test_max_epochs_caps_a_source_and_gives_the_rest_to_the_others():
    expected = expected_counts([1000, 5], [SchedulePoint(0.0, 100.0)], total=1005, shards=5)
    capped = cap_epochs(expected, [1000, 5], max_epochs=2)
    assert capped[:, 1].sum() == pytest.approx(10)
    np.testing.assert_allclose(capped.sum(axis=1), expected.sum(axis=1))
    counts = allocate(capped)
    assert counts[:, 1].sum() == 10 and counts.sum() == 1005
    with pytest.raises(ValueError, match="exceeds max_epochs"):
        cap_epochs(expected, [1000, 5], max_epochs=0.5)


def test_allocate_rows_sum_exactly_with_ties():
    expected = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 1.0], [1 / 3, 1 / 3, 1 / 3]])
    counts = allocate(expected)
    assert counts.sum(axis=1).tolist() == [1, 2, 1]
    assert counts.sum(axis=0).tolist() == [1, 2, 1] or counts.sum(axis=0).tolist() == [2, 1, 1]


def test_tokens_can_define_the_mixture():
    plan = plan_mix({"a": 10, "b": 10}, [SchedulePoint(0.0, 1.0)], 20, 1, weights_by_source={"a": 300, "b": 100})
    assert plan.counts.tolist() == [[15, 5]]


def test_token_budget_finds_the_smallest_output_that_reaches_it():
    from winnow.selectors.mixing import records_for_tokens

    sizes, mean_tokens = {"long": 100, "short": 100}, {"long": 30.0, "short": 10.0}
    # tau 1 over equal sizes: half long, half short -> 20 tokens per record on average
    assert records_for_tokens(2000, sizes, mean_tokens, [SchedulePoint(0.0, 1.0)]) == 100
    assert records_for_tokens(2001, sizes, mean_tokens, [SchedulePoint(0.0, 1.0)]) == 101
    with pytest.raises(ValueError, match="token budget"):
        records_for_tokens(0, sizes, mean_tokens, [SchedulePoint(0.0, 1.0)])


def test_groups_get_fixed_shares_with_temperature_sampling_inside_each():
    from winnow.selectors.mixing import Groups

    sizes = [900, 100, 300, 0]
    groups = Groups(("real", "real", "synthetic", "synthetic"), {"real": 0.5, "synthetic": 0.5})
    p = sampling_probabilities(sizes, 1.0, groups)
    np.testing.assert_allclose(p, [0.45, 0.05, 0.5, 0.0])
    p = sampling_probabilities(sizes, 1e9, groups)  # uniform inside each group
    np.testing.assert_allclose(p, [0.25, 0.25, 0.5, 0.0], atol=1e-6)
    empty = Groups(("real", "real", "synthetic", "synthetic"), {"real": 0.5, "synthetic": 0.5})
    np.testing.assert_allclose(sampling_probabilities([900, 100, 0, 0], 1.0, empty), [0.9, 0.1, 0, 0])
