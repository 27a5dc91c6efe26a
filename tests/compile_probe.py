"""What the regional-compile tests share (tests/test_compile.py on FLUX.1, tests/test_flux2_runtime.py on
FLUX.2): dynamo's count of compiled graphs, and a schedule that notes it before each step. The tests
start from a clean dynamo through the `fresh_dynamo` fixture (tests/conftest.py)."""

from torch._dynamo.utils import counters


def graphs() -> int:
    """Graphs dynamo has handed to a backend so far: each compile or recompile adds one."""
    return counters["stats"]["unique_graphs"]


class CountingSchedule:
    """A FluxSpace schedule that notes, before each step, how many graphs have been compiled."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def at_step(self, step, t, num_steps):
        self.seen.append(graphs())
        return self.inner.at_step(step, t, num_steps)
