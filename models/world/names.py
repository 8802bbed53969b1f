"""Unique, pronounceable invented names, computed from an id without a table.

Why: the world must stream (a billion-byte corpus never sits in memory), so the name of entity
``i`` has to be a pure function of (seed, i) and still be unique. A name core is three syllables,
each a consonant onset followed by a vowel nucleus; because onsets hold only consonants and nuclei
only vowels, a core spells back to exactly one syllable sequence, so distinct indices give distinct
strings. The index is scrambled by a keyed permutation of ``[0, 176**3)``: a 4-round Feistel
network on 24 bits with cycle walking back into the domain (Black & Rogaway 2002, "Ciphers with
arbitrary finite domains"), whose round functions are seeded lookup tables.
"""
from __future__ import annotations

import random

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "tr", "st", "th", "sh")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
SYLLABLES = tuple(o + n for o in ONSETS for n in NUCLEI)   # 176
N_SYL = len(SYLLABLES)
CORE_SPACE = N_SYL ** 3                                     # 5,451,776 distinct cores
MAX_ENTITIES = CORE_SPACE

_HALF_BITS = 12
_HALF_MASK = (1 << _HALF_BITS) - 1
_ROUNDS = 4
N_GIVEN = 256


class NameBook:
    """``core(i)``: the i-th unique three-syllable name; ``given(k)``: one of 256 given names."""

    def __init__(self, seed_bits: int):
        rng = random.Random(seed_bits)
        self._tables = [[rng.getrandbits(_HALF_BITS) for _ in range(1 << _HALF_BITS)]
                        for _ in range(_ROUNDS)]
        # Given names have two syllables, so they can never equal a (three-syllable) core.
        picks = rng.sample(range(N_SYL * N_SYL), N_GIVEN)
        self.given_names = tuple(
            (SYLLABLES[p // N_SYL] + SYLLABLES[p % N_SYL]).capitalize() for p in picks)

    def _permute(self, x: int) -> int:
        tables = self._tables
        while True:                                   # cycle walking: at most a few steps
            left, right = x >> _HALF_BITS, x & _HALF_MASK
            for table in tables:
                left, right = right, left ^ table[right]
            x = (left << _HALF_BITS) | right
            if x < CORE_SPACE:
                return x

    def core(self, index: int) -> str:
        if not 0 <= index < CORE_SPACE:
            raise IndexError(f"name index {index} outside [0, {CORE_SPACE})")
        x = self._permute(index)
        a, rest = divmod(x, N_SYL * N_SYL)
        b, c = divmod(rest, N_SYL)
        return (SYLLABLES[a] + SYLLABLES[b] + SYLLABLES[c]).capitalize()
