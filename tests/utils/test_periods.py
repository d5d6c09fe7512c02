from trainkit.utils.periods import period_fires


def test_a_period_fires_after_every_period_th_iteration_and_after_the_last():
    assert [it for it in range(50) if period_fires(20, it, 50)] == [19, 39, 49]
    assert [it for it in range(40) if period_fires(20, it, 40)] == [19, 39]


def test_period_zero_fires_only_after_the_last_and_no_max_iter_leaves_the_last_out():
    assert [it for it in range(50) if period_fires(0, it, 50)] == [49]
    assert [it for it in range(50) if period_fires(20, it, None)] == [19, 39]
    assert not any(period_fires(0, it, None) for it in range(50))
