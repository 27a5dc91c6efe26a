"""Inversion solvers (fluxspace/inversion.py) on velocity fields with known trajectories."""

import pytest
import torch

from flux_core.sampling import get_schedule
from fluxspace.inversion import InversionSettings, invert, reconstruct

SCHEDULE = get_schedule(12, 64, shift=True)  # shifted: uneven steps, as flux-mini samples
SETTINGS = {
    "euler": InversionSettings(),
    "midpoint": InversionSettings(solver="midpoint"),
    "fireflow": InversionSettings(solver="midpoint", reuse=True),
    "rf-inversion": InversionSettings(gamma=0.5, eta=0.9),
}


def straight_line(x0, eps):
    """The velocity field whose trajectories are the straight line x_t = (1 - t) x0 + t eps: v = eps - x0."""
    return lambda x, t, step: (eps - x0).expand_as(x)


@pytest.mark.parametrize("name", SETTINGS)
def test_straight_trajectories_invert_and_reconstruct_exactly(name):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    v = straight_line(x0, eps)
    s = SETTINGS[name]
    noise, _ = invert(v, x0, SCHEDULE, s, noise=eps)
    torch.testing.assert_close(noise, eps, rtol=0, atol=1e-5)
    back, _ = reconstruct(v, noise, SCHEDULE, s, y0=x0)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-5)


def test_curved_field_second_order_beats_euler():
    # v(x, t) = -x rotated: circular trajectories; Euler drifts outwards, midpoint much less.
    def rotate(x, t, step):
        return torch.stack([-x[..., 1], x[..., 0]], -1)

    x0 = torch.tensor([[[1.0, 0.0]]])
    errors = {}
    for name in ("euler", "midpoint", "fireflow"):
        noise, _ = invert(rotate, x0, SCHEDULE, SETTINGS[name])
        back, _ = reconstruct(rotate, noise, SCHEDULE, SETTINGS[name])
        errors[name] = (back - x0).norm().item()
    assert errors["midpoint"] < errors["euler"] / 5 and errors["fireflow"] < errors["euler"]


def test_evaluation_counts():
    v = straight_line(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    x = torch.zeros(1, 1, 1)
    assert invert(v, x, SCHEDULE, SETTINGS["euler"])[1] == 12
    assert invert(v, x, SCHEDULE, SETTINGS["midpoint"])[1] == 24
    assert invert(v, x, SCHEDULE, SETTINGS["fireflow"])[1] == 13  # one per step after the first


def test_zero_controls_are_plain_euler_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    x0, y1 = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)

    def field(x, t, step):
        return torch.sin(3 * x) + t  # any nonlinear field

    plain = InversionSettings()
    off = InversionSettings(gamma=0.0, eta=0.0)
    assert torch.equal(invert(field, x0, SCHEDULE, off, noise=y1)[0], invert(field, x0, SCHEDULE, plain)[0])
    assert torch.equal(reconstruct(field, y1, SCHEDULE, off, y0=x0)[0], reconstruct(field, y1, SCHEDULE, plain)[0])
    # eta = 1 on every step lands on y0 whatever the field.
    full = InversionSettings(eta=1.0, eta_start=0.0, eta_stop=1.0)
    torch.testing.assert_close(reconstruct(field, y1, SCHEDULE, full, y0=x0)[0], x0, rtol=0, atol=1e-5)


def test_linear_forward_time_feeds_i_over_n():
    seen = []

    def field(x, t, step):
        seen.append(t)
        return torch.zeros_like(x)

    invert(field, torch.zeros(1, 1, 1), SCHEDULE, InversionSettings(gamma=0.5, forward_time="linear"), noise=torch.zeros(1, 1, 1))
    assert seen == [i / 12 for i in range(12)]
    seen.clear()
    invert(field, torch.zeros(1, 1, 1), SCHEDULE, InversionSettings(gamma=0.5), noise=torch.zeros(1, 1, 1))
    assert seen == list(reversed(SCHEDULE))[:-1]


@pytest.mark.parametrize(
    "settings, message",
    [
        (InversionSettings(eta=1.5), r"eta must be in \[0, 1\]; got 1.5"),
        (InversionSettings(gamma=-0.1), r"gamma must be in \[0, 1\]; got -0.1"),
        (InversionSettings(solver="rk4"), "unknown solver 'rk4'; valid: euler, midpoint"),
        (InversionSettings(reuse=True), r"reuse \(FireFlow\) needs solver='midpoint'"),
        (InversionSettings(eta_start=0.5, eta_stop=0.2), r"eta_start \(0.5\) is after eta_stop \(0.2\)"),
        (InversionSettings(forward_time="shifted"), "unknown forward_time 'shifted'; valid: schedule, linear"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        settings.validate()
