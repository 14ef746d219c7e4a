"""Errors of the datapath, each naming the problem and the fix."""

from __future__ import annotations


class DatapathError(RuntimeError):
    """The datapath cannot do what was asked; the message says why and what to do."""


class KernelTooOld(DatapathError):
    """A hook the kernel does not have.  The agent refuses the feature with the
    same words the kernel test matrix prints when it skips it."""

    def __init__(self, hook: str, needs: tuple[int, int], has: tuple[int, int]) -> None:
        self.hook = hook
        self.needs = needs
        self.has = has
        super().__init__(
            f"{hook} needs Linux {needs[0]}.{needs[1]} or newer; this kernel is {has[0]}.{has[1]}"
        )


class PodError(DatapathError):
    """One pod cannot be enrolled; the others are unaffected."""

    def __init__(self, pod: str, problem: str) -> None:
        self.pod = pod
        super().__init__(f"pod {pod}: {problem}")
