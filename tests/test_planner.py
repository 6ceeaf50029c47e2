"""The planning rules, deterministically: injected time, fake costs, no threads."""

from __future__ import annotations

from edge.config import TaskConfig, TriggerConfig
from edge.inference.adapters import Detection, Prediction
from edge.schedule.planner import CostModel, Planner, WorkItem


def task(name: str, priority: int = 0, **kw) -> TaskConfig:
    return TaskConfig(name=name, model=name, priority=priority, **kw)


def costs(**ms: float) -> CostModel:
    model = CostModel(window=5, percentile=90)
    for name, value in ms.items():
        model.observe(name, value)
    return model


def run_frame(planner: Planner, frame_no: int, now_ms: float, budget_ms: float, *, actual: dict | None = None,
              motion: bool | None = None, predictions: dict | None = None) -> list[WorkItem]:
    """Play one frame through the plan, spending each item's estimate (or ``actual``)."""
    plan = planner.start(frame_no, now_ms, motion)
    remaining, ran = budget_ms, []
    while (item := plan.next(remaining)) is not None:
        spent = (actual or {}).get(item.task, planner.costs.estimate(item.task))
        remaining -= spent
        plan.done(item, spent, (predictions or {}).get(item.task))
        ran.append(item)
    plan.close()
    return ran


def names(items: list[WorkItem]) -> list[str]:
    return [i.task for i in items]


def test_tasks_run_in_priority_order_within_the_budget():
    p = Planner([task("low", 1), task("top", 10), task("mid", 5)], costs(top=10, mid=8, low=8), 5000)
    assert names(run_frame(p, 0, 0, budget_ms=20)) == ["top", "mid"]
    c = p.counters()
    assert c["low"].skips["budget"] == 1 and c["low"].runs == 0


def test_a_smaller_task_fills_the_budget_a_larger_one_cannot():
    p = Planner([task("top", 10), task("big", 5), task("small", 1)], costs(top=10, big=15, small=5), 5000)
    assert names(run_frame(p, 0, 0, budget_ms=20)) == ["top", "small"]


def test_the_top_task_always_runs_even_over_budget():
    p = Planner([task("top", 10)], costs(top=50), 5000)
    assert names(run_frame(p, 0, 0, budget_ms=10)) == ["top"]


def test_a_starved_task_runs_after_n_skips_but_never_before_a_higher_one():
    p = Planner([task("top", 10), task("high", 5), task("low", 1, starve_after=3)],
                costs(top=10, high=8, low=8), 5000)
    runs = [names(run_frame(p, f, f * 20.0, budget_ms=20)) for f in range(8)]
    assert runs[:3] == [["top", "high"]] * 3
    assert runs[3] == ["top", "high", "low"]  # forced, in its turn
    assert runs[4:7] == [["top", "high"]] * 3 and runs[7] == ["top", "high", "low"]
    c = p.counters()
    assert c["high"].skips["budget"] == 0 and c["high"].runs == 8
    assert c["low"].forced == 2 and c["low"].skips["budget"] == 6


def test_a_starving_task_is_not_forced_over_a_higher_one_skipped_in_the_same_frame():
    p = Planner([task("top", 10), task("high", 5), task("low", 1, starve_after=1)],
                costs(top=10, high=8, low=30), 5000)
    assert names(run_frame(p, 0, 0, budget_ms=20)) == ["top", "high"]  # low skipped: now starving
    # a stalled top run leaves no room for high: low may not take the overrun
    assert names(run_frame(p, 1, 20, budget_ms=20, actual={"top": 19})) == ["top"]
    assert names(run_frame(p, 2, 40, budget_ms=20)) == ["top", "high", "low"]


def test_actual_run_time_not_the_estimate_decides_what_still_fits():
    p = Planner([task("top", 10), task("next", 1)], costs(top=5, next=5), 5000)
    assert names(run_frame(p, 0, 0, budget_ms=12, actual={"top": 9})) == ["top"]


def test_periods_in_frames_and_in_milliseconds():
    p = Planner([task("every3", 2, every_n_frames=3), task("per100", 1, min_interval_ms=100)],
                costs(every3=1, per100=1), 5000)
    ran = [names(run_frame(p, f, f * 40.0, budget_ms=100)) for f in range(7)]
    assert [("every3" in r) for r in ran] == [True, False, False, True, False, False, True]
    # per100 at 0 ms, then 120 (frame 3), then 240 (frame 6)
    assert [("per100" in r) for r in ran] == [True, False, False, True, False, False, True]
    assert p.counters()["every3"].skips["period"] == 4


def test_the_cost_estimate_follows_a_model_that_slows_down_within_a_few_runs():
    model = CostModel(window=20, percentile=90)
    for _ in range(20):
        model.observe("t", 10)
    model.observe("t", 500)  # one outlier does not move the estimate
    assert model.estimate("t") == 10
    for _ in range(3):
        model.observe("t", 40)
    assert model.estimate("t") == 40  # three slow runs in a row do


def test_a_single_slow_run_cannot_set_the_estimate_even_with_two_samples():
    model = CostModel(window=20, percentile=90)
    model.observe("t", 15)
    model.observe("t", 430)
    assert model.estimate("t") == 15


def test_trigger_runs_on_the_best_crops_of_matching_detections_at_most_k():
    dets = tuple(Detection(0, label, score, (10 * i, 10, 10 * i + 5, 20))
                 for i, (label, score) in enumerate([("person", 0.6), ("dog", 0.9), ("person", 0.9),
                                                     ("person", 0.3), ("person", 0.8)]))
    p = Planner([task("detect", 10),
                 task("classify", 5, trigger=TriggerConfig(task="detect", classes=["person"],
                                                           min_score=0.5, max_crops=2, padding=0))],
                costs(detect=5, classify=2), 5000)
    ran = run_frame(p, 0, 0, 100, predictions={"detect": Prediction("yolov8", detections=dets)})
    assert names(ran) == ["detect", "classify", "classify"]
    assert [i.crop for i in ran[1:]] == [(20, 10, 25, 20), (40, 10, 45, 20)]  # the 0.9 and 0.8 persons
    assert p.counters()["classify"].crops == 2


def test_trigger_that_does_not_fire_is_skipped_with_its_reason():
    p = Planner([task("detect", 10), task("classify", 5, trigger=TriggerConfig(task="detect"))],
                costs(detect=5, classify=2), 5000)
    run_frame(p, 0, 0, 100, predictions={"detect": Prediction("yolov8")})
    assert p.counters()["classify"].skips["trigger"] == 1


def test_crops_that_do_not_fit_the_budget_are_skipped():
    dets = tuple(Detection(0, "person", 0.9, (0, 0, 5, 5)) for _ in range(3))
    p = Planner([task("detect", 10), task("classify", 5, trigger=TriggerConfig(task="detect", max_crops=3))],
                costs(detect=10, classify=4), 5000)
    ran = run_frame(p, 0, 0, 20, predictions={"detect": Prediction("yolov8", detections=dets)})
    assert names(ran) == ["detect", "classify", "classify"]


def test_motion_gate_skips_on_a_still_scene_until_the_keepalive():
    p = Planner([task("gated", 1, motion_gated=True)], costs(gated=1), keepalive_ms=1000)
    timeline = [(0, False), (100, False), (500, True), (600, False), (1400, False), (1700, False)]
    ran = [bool(run_frame(p, f, t, 100, motion=m)) for f, (t, m) in enumerate(timeline)]
    # never ran: runs; still: skipped; motion: runs (at 500); still at 600 and 1400 (900 ms since the
    # last run): skipped; still at 1700, 1200 ms since the last run: the keep-alive runs it
    assert ran == [True, False, True, False, False, True]
    assert p.counters()["gated"].skips["motion"] == 3


def test_no_motion_information_means_no_gating():
    p = Planner([task("gated", 1, motion_gated=True)], costs(gated=1), keepalive_ms=1000)
    assert all(run_frame(p, f, f * 10.0, 100, motion=None) for f in range(5))
