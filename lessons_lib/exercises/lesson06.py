"""Checkers for notebook 06 (load balancing)."""

import random

from .check import Incorrect, exercise


def _reference(loads, rng):
    if len(loads) == 1:
        return loads[0][0]
    i, j = rng.sample(range(len(loads)), 2)
    return loads[j][0] if loads[j][1] < loads[i][1] else loads[i][0]


@exercise("06.power_of_two", "power-of-two-choices routing")
def check_power_of_two(candidate):
    if candidate([("solo", 7)], random.Random(0)) != "solo":
        raise Incorrect("with one worker, return its id (there is nothing to sample)")
    cases = random.Random(6)
    argmin_only = True
    for case in range(200):
        n = cases.randint(2, 6)
        loads = [(f"w{k}", cases.randint(0, 9)) for k in range(n)]
        seed = cases.randrange(10**6)
        want, got = _reference(loads, random.Random(seed)), candidate(list(loads), random.Random(seed))
        i, j = random.Random(seed).sample(range(n), 2)
        if got != want:
            if got not in {loads[i][0], loads[j][0]}:
                hint = ("it is neither of the two sampled workers: draw them with exactly one call "
                        "rng.sample(range(len(loads)), 2)")
            else:
                hint = "of the two sampled workers, take the one with fewer outstanding requests (the first on ties)"
            raise Incorrect(f"loads={loads}, samples {loads[i][0]} and {loads[j][0]}: expected {want}, "
                            f"got {got}; {hint}")
        argmin_only &= got == min(loads, key=lambda w: w[1])[0]
    if argmin_only:
        raise Incorrect("every choice was the global minimum: that is least-outstanding, not two samples")
    return "matches power-of-two-choices on 200 seeded cases"
