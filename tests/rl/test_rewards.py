"""Reward functions: the built-ins, the registry and the checks that name
a broken reward."""

import math

import numpy as np
import pytest

from kft.rl import rewards as rl_rewards
from kft.rl.rewards import RewardError
from kft.rl.rewards import RewardSpec
from kft.rl.rewards import get_reward
from kft.rl.rewards import register_reward
from kft.rl.rewards import score_rewards


def test_builtin_rewards():
    exact = get_reward("exact_answer", pattern=r"(-?\d+)")
    assert exact(["q"] * 3, ["It is 85.", "85 or 86", "no"],
                 answer=["85", "85", "85"]) == [1.0, 0.0, 0.0]  # last number counts
    assert get_reward("exact_answer")(["q"], [" Paris. "], answer=["paris"]) == [1.0]
    fmt = get_reward("format", pattern=r"-?\d+")
    assert fmt(["q"] * 3, ["85", " 85\n", "47 + 38 = 85"]) == [1.0, 1.0, 0.0]
    anywhere = get_reward("format", pattern=r"= \d+", full_match=False)
    assert anywhere(["q"], ["47 + 38 = 85"]) == [1.0]
    length = get_reward("length", max_words=2)
    assert length(["q"] * 3, ["a b", "a b c d", ""]) == [1.0, 0.5, 1.0]
    assert get_reward("length", max_chars=4)(["q"], ["abcdefgh"]) == [0.5]


def test_registry_refuses_unknown_and_bad_options():
    with pytest.raises(ValueError, match="Did you mean 'format'"):
        get_reward("formats")
    with pytest.raises(ValueError, match="reward 'length'"):
        get_reward("length", max_word=3)
    with pytest.raises(ValueError, match="one of max_words or max_chars"):
        get_reward("length")
    with pytest.raises(ValueError, match="registered already"):
        register_reward("format", rl_rewards.format_reward)
    register_reward("always_one", lambda: (lambda p, c, **k: [1.0] * len(c)))
    try:
        assert get_reward("always_one")(["q"], ["x"]) == [1.0]
    finally:
        rl_rewards.REWARDS.pop("always_one")


def test_score_rewards_weights_and_columns():
    def has_answer(prompts, completions, answer, **columns):
        return [float(a in c) for c, a in zip(completions, answer)]

    total, per = score_rewards(
        [has_answer, RewardSpec(get_reward("length", max_words=1), 0.5, "short")],
        ["q", "q"], ["85", "it is 85"], {"answer": ["85", "85"]})
    np.testing.assert_allclose(per["has_answer"], [1, 1])
    np.testing.assert_allclose(per["short"], [1, 1 / 3])
    np.testing.assert_allclose(total, [1.5, 1 + 0.5 / 3], rtol=1e-6)
    total, _ = score_rewards(has_answer, ["q"], ["x"], {"answer": ["y"]},
                             weights=[2.0])
    assert total.tolist() == [0.0]


@pytest.mark.parametrize("scores, message", [
    (lambda n: [1.0] * (n + 1), "returned 3 values for 2 completions"),
    (lambda n: [1.0, math.nan], "non-finite value"),
    (lambda n: [1.0, "good"], "not a number"),
    (lambda n: 1 / 0, "raised ZeroDivisionError"),
])
def test_broken_rewards_are_named(scores, message):
    def broken_reward(prompts, completions, **columns):
        return scores(len(completions))

    with pytest.raises(RewardError, match=message) as info:
        score_rewards([get_reward("length", max_words=3), broken_reward],
                      ["q", "q"], ["a", "b"])
    assert "'broken_reward'" in str(info.value)
