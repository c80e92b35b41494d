import pytest

from parallel.distributed.layout import LayoutError, plan_layout

GPT_OSS_120B = dict(heads=64, kv_heads=8, experts=128, layers=36)


def layout(world, tp=1, ep=1, pp=1, dp=-1, **shape):
    return plan_layout(world, tp=tp, ep=ep, pp=pp, dp=dp, **(shape or GPT_OSS_120B))


def test_dp_fills_the_world():
    assert layout(8, tp=2).dp == 4
    assert layout(8, tp=4, ep=4).dp == 2
    assert layout(4, ep=2).mp == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(world=6, tp=4), "world size 6 is not divisible by pp x max(tp, ep) = 1 x 4 = 4"),
        (dict(world=8, tp=2, dp=2), "world size 8 != dp x pp x max(tp, ep) = 2 x 1 x 2 = 4"),
        (dict(world=16, tp=16), "parallel.tp=16 does not divide the model's 8 key/value heads"),
        (dict(world=3, tp=3), "parallel.tp=3 does not divide the model's 64 attention heads"),
        (dict(world=3, ep=3), "parallel.ep=3 does not divide the model's 128 experts"),
        (dict(world=8, tp=2, ep=4), "parallel.ep=4 must equal parallel.tp=2"),
        (dict(world=4, pp=2, ep=2), "parallel.pp > 1 with parallel.ep > 1"),
        (dict(world=2, tp=0), "parallel.tp=0 must be >= 1"),
        (dict(world=1, tp=2, dp=2), "one process runs here: start 4 with torchrun --nproc_per_node=4"),
    ],
)
def test_impossible_layouts_say_which_number_does_not_fit(kwargs, message):
    world = kwargs.pop("world")
    with pytest.raises(LayoutError) as e:
        layout(world, **kwargs)
    assert message in str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(LayoutError) as e:
        layout(3, tp=3, heads=8, kv_heads=4, experts=4, layers=2)
    assert "8 attention heads" in str(e.value) and "4 key/value heads" in str(e.value)
