"""Flow math against hand-computed values."""

import math

import pytest
import torch

from sd35flash import flow


def test_interpolate_and_predictions_by_hand():
    x0 = torch.tensor([[2.0, -1.0]])
    eps = torch.tensor([[0.5, 3.0]])
    t = torch.tensor([0.25])
    x_t = flow.interpolate(x0, eps, t)
    assert torch.allclose(x_t, torch.tensor([[0.75 * 2 + 0.25 * 0.5, 0.75 * -1 + 0.25 * 3]]))
    v = flow.target_velocity(x0, eps)
    assert torch.allclose(v, torch.tensor([[-1.5, 4.0]]))
    # the exact velocity recovers x0 and eps
    assert torch.allclose(flow.x0_from_v(x_t, v, t), x0)
    assert torch.allclose(flow.eps_from_v(x_t, v, t), eps)


def test_euler_step_moves_along_the_predicted_line():
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t, s = 0.9, 0.4
    x_s = flow.euler_step(x_t, v, t, s)
    assert torch.allclose(x_s, x_t + (s - t) * v)
    x0_hat, eps_hat = flow.x0_from_v(x_t, v, t), flow.eps_from_v(x_t, v, t)
    assert torch.allclose(x_s, (1 - s) * x0_hat + s * eps_hat, atol=1e-6)
    # a step to t = 0 lands on x0_hat
    assert torch.allclose(flow.euler_step(x_t, v, t, 0.0), x0_hat)


def test_shift_values_and_inverse():
    assert flow.shift_t(0.5, 3.0) == pytest.approx(0.75)
    assert flow.shift_t(1.0, 3.0) == pytest.approx(1.0)
    assert flow.shift_t(0.0, 3.0) == pytest.approx(0.0)
    assert flow.shift_t(0.25, 3.0) == pytest.approx(0.75 / 1.5)
    for t in (0.1, 0.3, 0.77):
        assert flow.unshift_t(flow.shift_t(t, 3.0), 3.0) == pytest.approx(t)


def test_sampling_schedule_four_steps_shift3():
    assert flow.sampling_schedule(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert flow.sampling_schedule(2, 1.0) == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        flow.sampling_schedule(0, 3.0)


def test_cfg_and_timestep_scale():
    vu, vc = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.apply_cfg(vu, vc, 1.0).item() == 3.0
    assert flow.apply_cfg(vu, vc, 4.0).item() == 9.0
    ts = flow.model_timestep(0.25, 3, "cpu")
    assert ts.shape == (3,) and torch.allclose(ts, torch.full((3,), 250.0))


def test_logit_normal_samples_are_shifted_upwards():
    g = torch.Generator().manual_seed(0)
    t0 = flow.sample_logit_normal(20000, generator=g)
    g = torch.Generator().manual_seed(0)
    t3 = flow.sample_logit_normal(20000, shift=3.0, generator=g)
    assert 0 < t0.min() and t0.max() < 1
    assert abs(t0.median().item() - 0.5) < 0.02
    assert abs(t3.median().item() - 0.75) < 0.02
    assert flow.logit_normal_density(0.5) == pytest.approx(1 / (math.sqrt(2 * math.pi) * 0.25))
