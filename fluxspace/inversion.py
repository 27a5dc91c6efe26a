"""Real images: image latent -> noise (inversion) and noise -> image (reconstruction or edit).

Time convention as everywhere here (flux_core/sampling.py): t = 1 noise, t = 0 data, the model
predicts v = dx/dt = eps - x0. Inversion integrates dx/dt = v *upwards*, from t = 0 (the image's
latent) to t = 1 over the sampling schedule read backwards; sampling integrates it back down.

Solvers, each usable for both directions:

- "euler": x <- x + (t' - t) v(x, t). One evaluation a step. Exact on straight trajectories,
  biased on curved ones: plain Euler inversion reconstructs poorly (FireFlow: 16.6 dB on photos).
- "midpoint": RF-Solver's second order step, x_mid = x + (dt/2) v(x, t), x <- x + dt v(x_mid, t + dt/2).
  Two evaluations a step; with reuse=True the first is the previous step's midpoint velocity
  (FireFlow), so one evaluation a step after the first.

RF-Inversion (Rout et al. 2024) controls both ODEs with a straight-line target:

    forward (t up, towards noise y1 ~ N(0, I)):   u_hat = u + gamma * ((y1 - Y) / (1 - t) - u)
    reverse (t down, towards the image y0):       v_hat = v + eta * ((X - y0) / t - v)   on [start, stop)

(the reverse guide, written in this file's convention: it is the velocity of the straight line from
y0 through X, so eta = 1 lands on y0 exactly). gamma = eta = 0 is plain Euler, bit for bit.

Which time the model sees during RF-Inversion's forward pass: the diffusers community pipeline
steps on the shifted schedule but feeds the model a linear t_i = i / N. We feed the schedule's own
t (forward_time="schedule", the default): the model is asked about the point it is actually at,
and inversion and sampling see the same times. forward_time="linear" reproduces the pipeline.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# v(x, t, step): (B, N, C) -> (B, N, C); step is the index of the solver step (sampling order for
# reconstruction, so a FluxSpace edit can switch on by step), t the time fed to the model.
Velocity = Callable[[Tensor, float, int], Tensor]
SOLVERS = ("euler", "midpoint")
FORWARD_TIMES = ("schedule", "linear")


@dataclass(frozen=True)
class InversionSettings:
    """How to invert: solver, RF-Inversion's controls, and the time the forward pass feeds the model."""

    solver: str = "euler"  # euler | midpoint
    reuse: bool = False  # midpoint only: reuse the previous midpoint velocity (FireFlow)
    gamma: float = 0.0  # RF-Inversion forward control strength in [0, 1]; 0: plain inversion
    eta: float = 0.0  # RF-Inversion reverse control strength in [0, 1]; 0: plain sampling
    eta_start: float = 0.0  # the reverse control is on for steps in [eta_start, eta_stop) x steps
    eta_stop: float = 0.25
    forward_time: str = "schedule"  # schedule | linear (see the module docstring)

    def validate(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; valid: {', '.join(SOLVERS)}")
        if self.reuse and self.solver != "midpoint":
            raise ValueError("reuse (FireFlow) needs solver='midpoint'")
        for name in ("gamma", "eta", "eta_start", "eta_stop"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
        if self.eta_start > self.eta_stop:
            raise ValueError(f"eta_start ({self.eta_start}) is after eta_stop ({self.eta_stop})")
        if self.forward_time not in FORWARD_TIMES:
            raise ValueError(f"unknown forward_time {self.forward_time!r}; valid: {', '.join(FORWARD_TIMES)}")


def _step(v: Velocity, x: Tensor, t: float, t_next: float, solver: str, carried: Tensor | None, feed_t: float, i: int):
    """One solver step from t to t_next; returns (x', the midpoint velocity to carry or None, evaluations)."""
    dt = t_next - t
    if solver == "euler":
        return x + dt * v(x, feed_t, i), None, 1
    first = carried if carried is not None else v(x, feed_t, i)
    v_mid = v(x + 0.5 * dt * first, feed_t + 0.5 * dt, i)
    return x + dt * v_mid, v_mid, 1 if carried is not None else 2


def invert(v: Velocity, x0: Tensor, timesteps: list[float], settings: InversionSettings = InversionSettings(),
           noise: Tensor | None = None) -> tuple[Tensor, int]:  # fmt: skip
    """The image latent x0 (B, N, C) at t = 0 -> its noise at t = 1. Returns (noise, model evaluations).

    timesteps: the sampling schedule (1 -> 0); inversion walks it backwards. noise: RF-Inversion's
    target y1 (required when gamma > 0).
    """
    settings.validate()
    if settings.gamma > 0 and noise is None:
        raise ValueError("RF-Inversion (gamma > 0) needs the target noise y1")
    up = list(reversed(timesteps))  # 0 -> 1
    n = len(up) - 1
    x, carried, evaluations = x0.float(), None, 0
    for i, (t, t_next) in enumerate(zip(up[:-1], up[1:], strict=True)):
        feed = i / n if settings.forward_time == "linear" else t
        if settings.gamma > 0:
            u = v(x, feed, i)
            evaluations += 1
            u_hat = u + settings.gamma * ((noise - x) / (1.0 - t) - u)
            x = x + (t_next - t) * u_hat
            continue
        x, carried, used = _step(v, x, t, t_next, settings.solver, carried if settings.reuse else None, feed, i)
        evaluations += used
    return x, evaluations


def reconstruct(v: Velocity, noise: Tensor, timesteps: list[float], settings: InversionSettings = InversionSettings(),
                y0: Tensor | None = None) -> tuple[Tensor, int]:  # fmt: skip
    """Noise (B, N, C) at t = 1 -> the latent at t = 0 over `timesteps`. Returns (latent, model evaluations).

    y0: the image latent RF-Inversion's reverse control steers to (required when eta > 0).
    """
    settings.validate()
    if settings.eta > 0 and y0 is None:
        raise ValueError("RF-Inversion (eta > 0) needs the image latent y0")
    n = len(timesteps) - 1
    on = range(round(settings.eta_start * n), round(settings.eta_stop * n))
    x, carried, evaluations = noise.float(), None, 0
    for i, (t, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        if settings.eta > 0 and i in on:
            u = v(x, t, i)
            evaluations += 1
            v_hat = u + settings.eta * ((x - y0) / t - u)
            x = x + (t_next - t) * v_hat
            carried = None
            continue
        x, carried, used = _step(v, x, t, t_next, settings.solver, carried if settings.reuse else None, t, i)
        evaluations += used
    return x, evaluations
