"""What a step costs: seconds as a function of the tokens it computes and the context they attend to.

    t = t0 + t1 * tokens + t1' * min(tokens, 16) + t2 * attended / 1024

where `attended` sums, over the step's tokens, the positions each attends to (a decode row at context
L adds L; a prompt chunk of n tokens starting at position s adds about n * (s + n / 2)). The matrix
products grow with tokens (the first rows of a step cost differently from the rest: the kernels
multiply up to 16 rows per pass over a weight), attention with attended positions, and each step
pays a fixed cost (dispatch, the lm_head's share, sampling). One model with one owner (the engine) serves every
decision that needs a step's time: the speculation governor (what a drafted token costs), the
prefill limit beside running streams (how many prompt tokens fit an inter-token target), admission
(a request's predicted time to its first token) and `fulmine plan` (capacity).

Fitted by least squares over measured steps, older steps' weight decaying, from a few calibration
steps at startup on (engine/calibration.py); a small ridge keeps the coefficients defined while the
steps seen so far do not vary enough to tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fulmine.executors.step import StepBatch

DECAY = 0.98  # weight of older steps
RIDGE = 1e-3  # pull toward the prior, relative to one step's weight
FEATURES = 4
SMALL = 16  # the rows one pass over a weight multiplies


@dataclass(frozen=True)
class StepShape:
    """What a step computes: its tokens and the positions they attend to, in total."""

    tokens: int
    attended: int

    @staticmethod
    def of(batch: StepBatch) -> StepShape:
        attended = sum(s.num_tokens * s.start + s.num_tokens * (s.num_tokens + 1) // 2 for s in batch.seqs)
        return StepShape(batch.num_tokens, attended)

    @staticmethod
    def decode(rows: int, context: int) -> StepShape:
        """`rows` decode rows, each at `context` positions."""
        return StepShape(rows, rows * context)

    def plus_prompt(self, tokens: int, start: int) -> StepShape:
        """This step with a prompt chunk of `tokens` tokens from position `start` added."""
        return StepShape(self.tokens + tokens, self.attended + tokens * start + tokens * (tokens + 1) // 2)


def _features(shape: StepShape) -> tuple[float, float, float, float]:
    return 1.0, float(shape.tokens), float(min(shape.tokens, SMALL)), shape.attended / 1024


class StepCostModel:
    def __init__(self, prior: tuple[float, float, float, float] = (5e-3, 1e-3, 1e-3, 1e-4)) -> None:
        self.prior = prior
        self.weight = 0.0  # total weight of the steps seen
        self.xx = [[0.0] * FEATURES for _ in range(FEATURES)]
        self.xy = [0.0] * FEATURES
        self.coef = prior
        self.steps = 0

    def observe(self, shape: StepShape, seconds: float) -> None:
        """A measured step."""
        if seconds <= 0 or shape.tokens <= 0:
            return
        x = _features(shape)
        for i in range(FEATURES):
            self.xy[i] = self.xy[i] * DECAY + x[i] * seconds
            for j in range(FEATURES):
                self.xx[i][j] = self.xx[i][j] * DECAY + x[i] * x[j]
        self.weight = self.weight * DECAY + 1
        self.steps += 1
        self.coef = self._solve()

    def _solve(self) -> tuple[float, float, float, float]:
        # ridge toward the prior, scaled by each feature's spread so it binds only where data is missing
        a = [row[:] for row in self.xx]
        b = self.xy[:]
        for i in range(FEATURES):
            lam = RIDGE * max(a[i][i], 1e-12)
            a[i][i] += lam
            b[i] += lam * self.prior[i]
        solution = _gauss(a, b)
        if solution is None:
            return self.coef
        # the fixed, per-token and attention costs cannot be negative (the first rows' extra can)
        return (max(solution[0], 0.0), max(solution[1], 0.0), solution[2], max(solution[3], 0.0))

    @property
    def fitted(self) -> bool:
        return self.steps >= 4

    def state(self) -> dict[str, object]:
        """What the fit has learned, as plain data (engine/calibration.py caches it)."""
        return {"weight": self.weight, "xx": self.xx, "xy": self.xy, "steps": self.steps}

    def restore(self, state: dict[str, object]) -> None:
        """The fit where `state` left it (ValueError if it is not one)."""
        xx, xy = state["xx"], state["xy"]
        if not (isinstance(xx, list) and len(xx) == FEATURES and all(len(row) == FEATURES for row in xx)):
            raise ValueError("not a cost model's state")
        if not (isinstance(xy, list) and len(xy) == FEATURES):
            raise ValueError("not a cost model's state")
        self.xx = [[float(v) for v in row] for row in xx]
        self.xy = [float(v) for v in xy]
        self.weight, self.steps = float(state["weight"]), int(state["steps"])  # type: ignore[arg-type, call-overload]
        self.coef = self._solve()

    def seconds(self, shape: StepShape) -> float:
        """Predicted seconds of a step of this shape."""
        return sum(c * x for c, x in zip(self.coef, _features(shape)))

    @property
    def fixed_seconds(self) -> float:
        return self.coef[0]

    def prompt_tokens_within(self, budget_s: float, base: StepShape, start: int, limit: int) -> int:
        """The most prompt tokens (from position `start`) a step of `base` can add and stay within
        `budget_s` seconds (0 if even `base` alone does not), at most `limit`."""
        lo, hi = 0, limit
        if self.seconds(base) > budget_s:
            return 0
        while lo < hi:  # the cost grows with the tokens: bisect
            mid = (lo + hi + 1) // 2
            if self.seconds(base.plus_prompt(mid, start)) <= budget_s:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _gauss(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve a x = b (small, dense) by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
