"""LR schedules: shape checks against closed forms at chosen steps."""

import math

import pytest

from flame_gin import schedules


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_warmup_is_linear_and_reaches_peak(name):
    fn = schedules.make_schedule(name=name, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    warm = [fn(s) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert fn(10) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_decays_monotonically_to_min_ratio(name):
    fn = schedules.make_schedule(name=name, warmup_steps=5, total_steps=50, min_lr_ratio=0.2)
    after = [fn(s) for s in range(5, 51)]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert fn(50) == pytest.approx(0.2)
    assert fn(500) == pytest.approx(0.2)  # past the end it stays at the floor


def test_cosine_midpoint_and_linear_midpoint():
    cos = schedules.make_schedule(name="cosine", warmup_steps=0, total_steps=100, min_lr_ratio=0.0)
    lin = schedules.make_schedule(name="linear", warmup_steps=0, total_steps=100, min_lr_ratio=0.0)
    assert cos(50) == pytest.approx(0.5)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lin(25) == pytest.approx(0.75)


def test_wsd_is_flat_then_decays_in_last_fraction():
    fn = schedules.make_schedule(
        name="wsd", warmup_steps=10, total_steps=100, min_lr_ratio=0.0, decay_ratio=0.2, decay_shape="linear"
    )
    assert [fn(s) for s in range(10, 81)] == pytest.approx([1.0] * 71)
    assert fn(90) == pytest.approx(0.5)
    sqrt = schedules.make_schedule(name="wsd", warmup_steps=0, total_steps=100, decay_ratio=0.2)
    assert sqrt(85) == pytest.approx(1 - math.sqrt(0.25))


def test_schedule_is_a_pure_function_of_step():
    fn = schedules.make_schedule(name="cosine", warmup_steps=3, total_steps=30)
    assert [fn(s) for s in (7, 3, 7)] == [fn(7), fn(3), fn(7)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="nope", warmup_steps=0, total_steps=10), "Unknown LR schedule 'nope'"),
        (dict(name="cosine", warmup_steps=-1, total_steps=10), "warmup_steps=-1 must be >= 0"),
        (dict(name="cosine", warmup_steps=0, total_steps=10, min_lr_ratio=1.5), "min_lr_ratio=1.5"),
        (dict(name="wsd", warmup_steps=0, total_steps=10, decay_shape="cubic"), "decay_shape 'cubic'"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.make_schedule(**kwargs)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_warmup_longer_than_the_run_shortens_to_the_run_with_a_warning(name, caplog):
    with caplog.at_level("WARNING"):
        short = schedules.make_schedule(name=name, warmup_steps=20, total_steps=10)
    same = schedules.make_schedule(name=name, warmup_steps=10, total_steps=10)
    assert [short(s) for s in range(11)] == [same(s) for s in range(11)]
    assert [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()] == [
        "schedule: warmup_steps=20 is longer than the run (10 steps); warming up over 10 steps"
    ]
