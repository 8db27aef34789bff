"""The one Euler loop and the ``Schedule`` type: sampling, the student rollout and the teacher
trajectories all integrate through ``flow.euler_sample`` and reproduce a hand-written Euler loop
exactly; pinned sums catch any change to the numbers themselves."""

from __future__ import annotations

import pytest
import torch

from sd35flash import flow
from sd35flash.distill.rollout import rollout_to_step, student_sample
from sd35flash.distill.trajectory import teacher_schedule, teacher_trajectories
from sd35flash.flow import Schedule
from sd35flash.sampling import PromptEmbeds, encode_prompts, guided_velocity, predict_velocity, sample_latents

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]

#: Sums of the outputs below on the shared tiny pipeline, computed before the loops were merged
#: into ``flow.euler_sample`` (the merge left every output bit-identical).
PINNED = {"sample_cfg": -60.7561640329659, "sample_router": -53.982803103514016, "rollout": -19.74663543794304,
          "student_sample": -47.595847968012094, "teacher": -85.37006630282849}


@pytest.fixture(scope="module")
def setup(tiny_pipeline):
    pipe = tiny_pipeline()
    cond = encode_prompts(pipe, PROMPTS, device="cpu")
    u = encode_prompts(pipe, [""], device="cpu")
    uncond = PromptEmbeds(u.embeds.expand(3, -1, -1), u.pooled.expand(3, -1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe.transformer, cond, uncond, noise


def _by_hand(transformer, x, times, cond, uncond=None, guidance=1.0, stop=None):
    """Euler written out: ``x <- x + (s - t) v(x, t)`` for consecutive ``(t, s)``; every state."""
    states = [x]
    for t, s in list(zip(times, times[1:]))[:stop]:
        v = guided_velocity(transformer, x, t, cond, uncond, guidance).to(x.dtype)
        x = x + (s - t) * v
        states.append(x)
    return states


def test_schedule_type():
    s = flow.sampling_schedule(4, 3.0)
    assert s.times == pytest.approx((1.0, 0.9, 0.75, 0.5, 0.0)) and s.steps == 4 and len(s) == 5
    assert s.step_times == pytest.approx([1.0, 0.9, 0.75, 0.5]) and Schedule.from_step_times(s.step_times) == s
    assert s.pairs()[0] == (1.0, 0.9) and s.pairs()[-1] == (0.5, 0.0) and s.to_list() == list(s.times)
    assert Schedule.of([1, 0.5, 0]) == Schedule((1.0, 0.5, 0.0)) and Schedule.of(s) is s
    for bad in ([1.0], [1.0, 0.5], [1.0, 1.0, 0.0], [0.5, 0.75, 0.0], [2.0, 0.5, 0.0], [float("nan"), 0.0]):
        with pytest.raises(ValueError, match=r"strictly descending times in \[0, 1\] ending at 0"):
            Schedule(tuple(bad))


def test_euler_sample_runs_the_given_steps_and_reports_each():
    x = torch.ones(2)
    seen = []
    out = flow.euler_sample(lambda i, t, x: torch.full_like(x, 2.0), x, Schedule((1.0, 0.75, 0.25, 0.0)), steps=2,
                            after_step=lambda i, x, v, x_next: seen.append((i, float(x[0]), float(x_next[0]))))
    assert seen == [(0, 1.0, 0.5), (1, 0.5, -0.5)] and torch.equal(out, torch.full((2,), -0.5))


def test_sampler_rollout_and_trajectories_equal_euler_by_hand(setup):
    transformer, cond, uncond, noise = setup
    sched = flow.sampling_schedule(4, 3.0)
    got = {"sample_cfg": sample_latents(transformer, noise, sched, cond, uncond, 4.0),
           "sample_router": sample_latents(lambda i, t: transformer, noise, sched, cond, uncond, 2.0)}
    assert torch.equal(got["sample_cfg"], _by_hand(transformer, noise, sched.times, cond, uncond, 4.0)[-1])
    assert torch.equal(got["sample_router"], _by_hand(transformer, noise, sched.times, cond, uncond, 2.0)[-1])

    idx = torch.tensor([0, 3, 2])
    states = _by_hand(transformer, noise, sched.times, cond, stop=3)
    got["rollout"] = rollout_to_step(transformer, noise, sched, cond, idx)
    want = torch.stack([states[i][b] for b, i in enumerate(idx.tolist())])
    assert torch.equal(got["rollout"], want)
    assert torch.equal(rollout_to_step(lambda j, t: transformer, noise, sched, cond, idx), want)
    got["student_sample"] = student_sample(transformer, noise, sched, cond, idx)
    t_i = torch.tensor(sched.times)[idx]
    assert torch.equal(got["student_sample"], flow.x0_from_v(want, predict_velocity(transformer, want, t_i, cond), t_i))

    teacher, record = teacher_schedule(Schedule.from_step_times([1.0, 0.75]), 4, 3.0)
    assert record == [0, 2, 4]
    got["teacher"] = teacher_trajectories(transformer, noise, teacher, record, cond, uncond, 4.0)
    states = _by_hand(transformer, noise, teacher.times, cond, uncond, 4.0)
    assert torch.equal(got["teacher"], torch.stack([states[r] for r in record], dim=1))

    for name, x in got.items():
        assert float(x.double().sum()) == pytest.approx(PINNED[name], rel=1e-5, abs=1e-3), name
