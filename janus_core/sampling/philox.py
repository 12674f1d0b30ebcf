"""Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11), vectorised with numpy.

A counter-based generator is a keyed bijection: the output for (key, counter) is a pure function of
both, with no state carried from one draw to the next. The sampler keys it with a request's seed
(image i of a request: seed + i) and counts the step, so the uniform that picks image i's code at
step t is the same whatever else shares the batch, in whichever order, and after a preemption.
Philox4x32-10 is the generator of cuRAND and of torch's CUDA RNG, and passes TestU01's BigCrush;
`tests/unit/test_sampler.py` checks the Random123 known-answer vectors.

numpy's uint64 products of 32-bit words are exact (< 2^64), so each round's hi/lo halves are plain
shifts and masks.
"""

from __future__ import annotations

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # key schedule (Weyl) increments
_MASK = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox4x32(counter: tuple, key: tuple, rounds: int = 10) -> tuple[np.ndarray, ...]:
    """Philox4x32 over arrays: `counter` 4 words, `key` 2 words (each broadcastable uint64 < 2^32)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _32) ^ c1 ^ k0), (p1 & _MASK), ((p0 >> _32) ^ c3 ^ k1), (p0 & _MASK)
    return c0, c1, c2, c3


def uniforms(seed: int, steps: np.ndarray | range) -> np.ndarray:
    """One uniform in (0, 1) per step for the stream keyed by `seed` (float64, 53 random bits each)."""
    t = np.asarray(steps, dtype=np.uint64)
    s = np.uint64(seed % 2**64)
    o0, o1, _, _ = philox4x32((t & _MASK, t >> _32, np.uint64(0), np.uint64(0)), (s & _MASK, s >> _32))
    bits = (o0 >> np.uint64(5)) * np.uint64(1 << 26) + (o1 >> np.uint64(6))  # 27 + 26 bits
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)
