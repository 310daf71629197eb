"""A PI controller: the regulariser weight that drives a measured quantity toward its target.

MrT5 (Kallini et al., ICLR 2025) trains its delete gate with a loss α·mean(G) and adjusts α during
training so that the deletion ratio approaches a target: α_{t+1} = max(0, k_p·e_t + k_i·Σ_{s≤t} e_s),
e_t = target − measured_t. Positive error (too little deleted) raises α; the integral term removes the
steady-state error that a proportional term alone leaves.
"""

from __future__ import annotations


class PIController:
    def __init__(self, target: float, kp: float, ki: float, initial: float = 0.0):
        self.target, self.kp, self.ki = float(target), float(kp), float(ki)
        self.integral = initial / self.ki if self.ki else 0.0
        self.value = float(initial)

    def update(self, measured: float) -> float:
        """The new weight after observing `measured`; never negative (the integral does not wind up
        below zero either)."""
        error = self.target - float(measured)
        self.integral = max(0.0, self.integral + error)
        self.value = max(0.0, self.kp * error + self.ki * self.integral)
        return self.value
