"""The demo fits its whole schedule to the time budget: shorter on a slow machine, never truncated (issue 30)."""

import pytest

from align_detr_hf.recipes import FROM_SCRATCH, fit_schedule


def test_a_fast_machine_gets_the_recipes_schedule():
    s = fit_schedule(FROM_SCRATCH, step_seconds=0.1, budget_seconds=480)  # 2000 steps take 200 s
    assert (s.max_steps, s.warmup_steps, s.milestones) == (2000, 30, (1600,))


@pytest.mark.parametrize("step_seconds", [0.5, 1.0, 2.4, 7.0])
def test_a_slow_machine_gets_a_shorter_complete_schedule_in_proportion(step_seconds):
    budget = 480.0
    s = fit_schedule(FROM_SCRATCH, step_seconds=step_seconds, budget_seconds=budget)
    assert s.max_steps == int(budget / step_seconds) < FROM_SCRATCH.max_train_steps
    assert s.max_steps * step_seconds <= budget
    # warm-up and lr drop at the recipe's fractions of the new length (to the nearest step)
    assert abs(s.warmup_steps - FROM_SCRATCH.warmup_steps / FROM_SCRATCH.max_train_steps * s.max_steps) <= 0.5
    (drop,) = s.milestones
    assert abs(drop - FROM_SCRATCH.lr_drop_fraction * s.max_steps) < 1 and drop < s.max_steps
    # the lr rises, holds, and has dropped x0.1 for the last steps
    assert s.lr_factor(0) == pytest.approx(FROM_SCRATCH.warmup_start_factor)
    assert s.lr_factor(s.warmup_steps) == 1.0 and s.lr_factor(s.max_steps - 1) == pytest.approx(0.1)


def test_a_tiny_budget_still_drops_the_lr_before_the_end():
    s = fit_schedule(FROM_SCRATCH, step_seconds=10.0, budget_seconds=35)
    assert s.max_steps == 3 and s.milestones == (2,) and s.lr_factor(2) == pytest.approx(0.1)


def test_a_refit_keeps_what_has_run():
    first = fit_schedule(FROM_SCRATCH, step_seconds=1.0, budget_seconds=480)  # 480 steps, drop at 384
    # slower after 100 steps: 200 more fit; the warm-up already run is kept, the drop moves with the new end
    slower = fit_schedule(FROM_SCRATCH, step_seconds=2.0, budget_seconds=400, steps_done=100, previous=first)
    assert (slower.max_steps, slower.warmup_steps, slower.milestones) == (300, first.warmup_steps, (240,))
    # after the drop it stays where it happened, even if the end moves
    later = fit_schedule(FROM_SCRATCH, step_seconds=4.0, budget_seconds=40, steps_done=250, previous=slower)
    assert (later.max_steps, later.milestones) == (260, (240,))
    # a drop not yet reached but past the new 80% happens now, before the end
    late = fit_schedule(FROM_SCRATCH, step_seconds=4.0, budget_seconds=20, steps_done=230, previous=slower)
    assert late.max_steps == 235 and late.milestones == (230,)


def test_bad_timings_are_refused():
    with pytest.raises(ValueError, match="step_seconds must be > 0"):
        fit_schedule(FROM_SCRATCH, step_seconds=0.0, budget_seconds=10)


def test_a_short_demo_ends_within_its_budget_having_completed_its_schedule(tmp_path, capsys):
    from align_detr_hf.demo import main

    # far more steps asked than fit in 20 s: the demo must shorten the schedule, not cut it (~40 s in all)
    budget = 20.0
    result = main(["--output_dir", str(tmp_path), "--num_train_images", "16", "--num_val_images", "4",
                   "--image_size", "64", "--max_steps", "5000", "--time_budget_s", str(budget), "--threads", "1"])
    out = capsys.readouterr().out
    schedule = result["schedule"]
    assert result["completed_schedule"] and not result["stopped_early"]
    assert result["steps"] == schedule["max_steps"] < 5000
    # within the budget, up to one step (the granularity of the check; step times are noisy on a shared machine)
    assert result["train_seconds"] <= budget + result["train_seconds"] / result["steps"]
    assert schedule["milestones"][0] < schedule["max_steps"]  # the lr dropped before the end
    assert "schedule for the 20s budget:" in out and "scaled from 5000" in out
    assert "README / BENCHMARKS.md report mAP" in out and f"measured mAP {result['metrics']['map']:.3f}" in out
