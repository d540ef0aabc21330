"""`DecryptedRows`: what a secure pool's coordinator has decrypted of each row, so it never learns a silo's score.

Each secure round hands the coordinator one weighted sum per row,
sum_k v_k r_k, with v the weights it sent (0 for the silos not in the round).
One sum hides every score among the silos it weights. Several sums of the
same row under different vectors are a linear system in that row's scores:
silo k's score is determined once e_k lies in the span of the row's vectors
(two silos and two weightings; or uniform weights over {A, B, C} and, after C
dropped out, over {A, B}: three times the first minus twice the second is
C's score). GRPO fuses the same (image, prompt, response) in many steps, and
an evaluation fuses its test pairs under every method and seed, so the
honest coordinator code would assemble such systems unless something keeps
count across calls, fusions and processes. This record does:

- a row fused again under the same weights is answered from the record
  (`known`), whichever silos answered the first time, so a dropout never
  gives a second sum of it under the same weighting. "The same" is to within
  `SAME_WEIGHTS`: a router's weights for one row differ in their last bits
  with the batch it was computed in (CPU kernels block by batch size), and
  every such variant would be another, ill-conditioned, equation;
- before a sum is decrypted, `refuse_revealing` raises `RevealingSumError` if
  it would put some e_k in the span of the row's decrypted vectors (in
  exact arithmetic: `determined_silo`). Sums that determine a score only
  approximately (two weightings whose difference is nearly one silo's) are
  not refused, as one weighting concentrated on a silo is not
  (docs/threat-model.md).

Rows are keyed by the objective, the SHA-256 of the image file's bytes, the
prompt and the response; vectors by silo name (a method's columns follow its
router, another's the pool). With a path the record is a SQLite file kept
with `synchronous=FULL`, since what a crash forgot a restarted evaluation
could decrypt again; without one it lasts as long as the object.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from mor_secure.secagg.fixed_point import SCALE

from .silo_requests import image_blob

# Weights of one row closer than this (each, per silo) are the same weighting: the silos encode each term w_k r_k
# at a resolution of 1/SCALE (2^-20), so a smaller change of w moves the sum by less than its own rounding.
SAME_WEIGHTS = 1.0 / SCALE

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decrypted (
    row TEXT NOT NULL,          -- sha256 of (objective, image digest, prompt, response)
    requested BLOB NOT NULL,    -- float64 weight per silo of `silos` the fusion was asked for (the router's row)
    vector BLOB NOT NULL,       -- float64 weight per silo of `silos` in the sum, 0 for a silo not in the round
    fused REAL NOT NULL         -- the fused reward the coordinator formed from that sum
);
CREATE INDEX IF NOT EXISTS decrypted_by_row ON decrypted (row);
CREATE TABLE IF NOT EXISTS silos (position INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
"""


class RevealingSumError(ValueError):
    """Decrypting this sum would let the coordinator solve for one silo's score on a row."""


class DecryptedRows:
    """The rows a secure pool has decrypted, under which weights (see the module docstring)."""

    def __init__(self, silo_names: Sequence[str], path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if self.path is None else self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        stored = [name for (name,) in self._db.execute("SELECT name FROM silos ORDER BY position")]
        if stored and sorted(stored) != sorted(silo_names):
            raise ValueError(f"{self.path} records the rows decrypted over silos {stored}, not {sorted(silo_names)}; "
                             "a pool with other silos needs a record of its own (decrypted_rows: in the pool file)")
        if not stored:
            with self._db:
                self._db.executemany("INSERT INTO silos VALUES (?, ?)", enumerate(sorted(silo_names)))
        self.silo_names = tuple(sorted(silo_names))
        self._column = {name: k for k, name in enumerate(self.silo_names)}

    @staticmethod
    def row_keys(objective: str, images: Sequence[str | Path], prompts: Sequence[str],
                 responses: Sequence[str]) -> list[str]:
        """Each row's key: the same image bytes, prompt, response and objective are the same row to a silo."""
        return [hashlib.sha256("\0".join((objective, image_blob(image).sha256, prompt, response))
                               .encode("utf-8", "surrogatepass")).hexdigest()
                for image, prompt, response in zip(images, prompts, responses, strict=True)]

    def known(self, rows: Sequence[str], weights: Sequence[Mapping[str, float]]) -> list[float | None]:
        """Per row, the fused reward formed before under the same requested weights (`SAME_WEIGHTS`), or None."""
        found = []
        for row, requested in zip(rows, weights, strict=True):
            wanted = self._vector(requested)
            found.append(next((fused for blob, fused in self._db.execute(
                "SELECT requested, fused FROM decrypted WHERE row = ?", (row,))
                if np.abs(np.frombuffer(blob, dtype=np.float64) - wanted).max() <= SAME_WEIGHTS), None))
        return found

    def _vector(self, weights: Mapping[str, float]) -> np.ndarray:
        vector = np.zeros(len(self.silo_names))
        for name, weight in weights.items():
            vector[self._column[name]] = weight
        return vector

    def _vectors(self, row: str) -> list[np.ndarray]:
        return [np.frombuffer(blob, dtype=np.float64)
                for (blob,) in self._db.execute("SELECT vector FROM decrypted WHERE row = ?", (row,))]

    def refuse_revealing(self, rows: Sequence[str], vectors: Sequence[Mapping[str, float]]) -> None:
        """RevealingSumError if one row's sum under its vector here, with its sums decrypted before, would
        determine a silo's score on it."""
        for index, (row, weights) in enumerate(zip(rows, vectors, strict=True)):
            earlier = self._vectors(row)
            if not earlier:
                continue
            silo = determined_silo([*earlier, self._vector(weights)], self.silo_names)
            if silo is not None:
                raise RevealingSumError(
                    f"row {index} of this round was decrypted before under {len(earlier)} other weighting(s); one "
                    f"more sum of it would determine the score of silo {silo!r} on it, so it is not decrypted. A "
                    "secure pool fuses each row under few enough weightings that no silo's score can be solved for: "
                    "compare several methods, seeds or held-out routers on the same rows over a pool with "
                    "aggregation: clear (benchmark data only), or on other rows")

    def add(self, rows: Sequence[str], requested: Sequence[Mapping[str, float]],
            vectors: Sequence[Mapping[str, float]], fused: Sequence[float]) -> None:
        """Record the decrypted sums of `rows` (one transaction, on disk before it returns)."""
        with self._db:
            self._db.executemany("INSERT INTO decrypted VALUES (?, ?, ?, ?)", [
                (row, self._vector(weights).tobytes(), self._vector(vector).tobytes(), float(value))
                for row, weights, vector, value in zip(rows, requested, vectors, fused, strict=True)])

    def close(self) -> None:
        self._db.close()


def determined_silo(vectors: Sequence[Sequence[float]], silo_names: Sequence[str]) -> str | None:
    """The first silo whose score the sums under `vectors` ([m][K]) determine exactly (e_k in their span), or None.

    In exact arithmetic on the weights as sent (each a float, so a dyadic rational): any tolerance would either
    let through a combination that solves to the last bit or refuse generic router weightings now and then.
    """
    basis: list[tuple[int, list[Fraction]]] = []  # reduced row echelon form: (pivot column, row)

    def reduced(vector: list[Fraction]) -> list[Fraction]:
        for pivot, row in basis:
            if vector[pivot]:
                factor = vector[pivot]
                vector = [v - factor * r for v, r in zip(vector, row, strict=True)]
        return vector

    for raw in vectors:
        vector = reduced([Fraction(float(w)) for w in raw])
        pivot = next((k for k, v in enumerate(vector) if v), None)
        if pivot is None:
            continue
        vector = [v / vector[pivot] for v in vector]
        basis = [(p, [r - row[pivot] * v for r, v in zip(row, vector, strict=True)]) for p, row in basis]
        basis.append((pivot, vector))
    for k, name in enumerate(silo_names):
        unit = [Fraction(int(j == k)) for j in range(len(silo_names))]
        if not any(reduced(unit)):
            return name
    return None
