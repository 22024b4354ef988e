#!/usr/bin/env python3
"""Write native/include/shmb/crc32c_tables.h: the constant tables of native/src/crc32c.c.

Usage: python tools/gen_crc32c_tables.py [--check]

The tables are constants (not filled at start-up) so that the C core keeps no mutable global
state apart from the one-time CPU dispatch. Two kinds:

* ``shmb_crc32c_slice8[8][256]``: slice-by-8 tables of the portable path.
  ``t[0][n]`` is the CRC register after feeding byte ``n`` into a register of 0;
  ``t[k][n]`` is ``t[k-1][n]`` fed one more zero byte.
* ``shmb_crc32c_zeros_long[4][256]`` / ``..._short``: "append LEN zero bytes" operators used
  by the SSE4.2 path to combine three interleaved streams (Mark Adler's method). The raw
  (not inverted) register is linear over GF(2), so feeding LEN zeros into register ``x`` is
  ``z[0][x & 0xff] ^ z[1][(x >> 8) & 0xff] ^ z[2][(x >> 16) & 0xff] ^ z[3][x >> 24]``.
* ``shmb_crc32c_fold_<D>[2]``: carry-less-multiply constants of the PCLMULQDQ / VPCLMULQDQ
  paths, which move a 128-bit accumulator D bits further down the message (derivation below,
  at ``fold_constants``).
"""
from __future__ import annotations

import pathlib
import sys

POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
LONG_BYTES = 8192
SHORT_BYTES = 256
# Fold distances in bits used by native/src/crc32c.c: 2048 is the stride of the four 512-bit
# accumulators, 512 that of four 128-bit accumulators (and of one 512-bit accumulator),
# 384/256/128 merge four 128-bit lanes into one.
FOLD_BITS = (2048, 512, 384, 256, 128)
OUT = pathlib.Path(__file__).resolve().parent.parent / "native/include/shmb/crc32c_tables.h"


def byte_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


def slice8(t0: list[int]) -> list[list[int]]:
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ t0[prev[n] & 0xFF] for n in range(256)])
    return tables


def zeros_operator(t0: list[int], nbytes: int) -> list[list[int]]:
    # Image of each of the 32 register bits after nbytes zero bytes; XOR them for any value.
    basis = []
    for bit in range(32):
        c = 1 << bit
        for _ in range(nbytes):
            c = (c >> 8) ^ t0[c & 0xFF]
        basis.append(c)
    out = []
    for k in range(4):
        row = []
        for n in range(256):
            v = 0
            for b in range(8):
                if n >> b & 1:
                    v ^= basis[8 * k + b]
            row.append(v)
        out.append(row)
    return out


def xpow_mod(n: int) -> int:
    """x^n mod P, bit-reflected: bit i of the result is the coefficient of x^(31 - i).

    Multiplying by x moves every coefficient one bit to the right; the coefficient that leaves
    bit 0 is that of x^32, which is replaced by P - x^32 (that is, POLY)."""
    v = 1 << 31  # x^0
    for _ in range(n):
        v = (v >> 1) ^ POLY if v & 1 else v >> 1
    return v


def fold_constants(bits: int) -> tuple[int, int]:
    """The two 64-bit lanes (low, high) that fold a 128-bit accumulator ``bits`` further on.

    The CRC of a message M (raw register, no inversions) is M(x) * x^32 mod P, and M can be
    replaced by anything congruent to it mod P. Cut M into 128-bit blocks. A little-endian
    128-bit load of a reflected stream holds the coefficient of x^(127 - i) in bit i, so its
    low qword H carries x^127..x^64 and its high qword L carries x^63..x^0:
    A = H * x^64 + L. Moving A ``D`` bits further (past D more bits of message) gives

        A * x^D = H * x^(D + 64) + L * x^D  ==  H * (x^(D + 64) mod P) + L * (x^D mod P)

    and both products have degree < 96, so the sum fits one 128-bit accumulator again.

    PCLMULQDQ multiplies integers, and on reflected operands that costs one extra x: for
    64-bit operands a (bit i = x^(63 - i)) and b, bit k of the 128-bit product is the
    coefficient of x^(126 - k), i.e. the product read as a 128-bit reflected value is
    a * b * x. Store the constant c (degree < 32) as ``xpow_mod(...) << 1``, so that bit i
    holds x^(32 - i): read as a 64-bit reflected value that is c * x^31, and the product read
    as 128 bits is H * c * x^32. Hence c = x^(D + 64 - 32) mod P for the low lane (times H) and
    c = x^(D - 32) mod P for the high lane (times L). ``_check_fold`` runs this on a message.
    """
    return xpow_mod(bits + 32) << 1, xpow_mod(bits - 32) << 1


def _clmul(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        b >>= 1
    return r


def _check_fold(t0: list[int]) -> None:
    """Model of the C fold loop in Python, against the bytewise CRC, on a fixed message: four
    128-bit accumulators 512 bits apart, merged with the 384/256/128 folds, then the crc32
    instruction's step (register * x^64 + qword * x^32 mod P) on the two qwords."""
    msg = bytes((i * 131 + (i >> 7) * 29 + 7) & 0xFF for i in range(64 * 7 + 16 * 3))
    want = 0xFFFFFFFF
    for byte in msg:
        want = t0[(want ^ byte) & 0xFF] ^ (want >> 8)
    lo_mask = (1 << 64) - 1

    def fold(acc: int, bits: int) -> int:
        k_lo, k_hi = fold_constants(bits)
        return _clmul(acc & lo_mask, k_lo) ^ _clmul(acc >> 64, k_hi)

    blocks = [int.from_bytes(msg[i:i + 16], "little") for i in range(0, len(msg), 16)]
    blocks[0] ^= 0xFFFFFFFF  # the initial register goes into the first four bytes
    acc = blocks[:4]
    n = 4
    while len(blocks) - n >= 4:
        acc = [fold(acc[j], 512) ^ blocks[n + j] for j in range(4)]
        n += 4
    one = fold(acc[0], 384) ^ fold(acc[1], 256) ^ fold(acc[2], 128) ^ acc[3]
    for block in blocks[n:]:
        one = fold(one, 128) ^ block
    reg = 0
    for qword in (one & lo_mask, one >> 64):
        reg ^= qword  # crc32 with a 64-bit operand: XOR it in, then feed 8 zero bytes
        for _ in range(8):
            reg = t0[reg & 0xFF] ^ (reg >> 8)
    assert reg == want, "fold constants do not reproduce the CRC"


def c_fold(bits: int) -> list[str]:
    k_lo, k_hi = fold_constants(bits)
    return [
        f"/* Fold a 128-bit lane {bits} bits on: {{x^{bits + 32} mod P, x^{bits - 32} mod P}},"
        " reflected, << 1. */",
        f"static const uint64_t shmb_crc32c_fold_{bits}[2] = {{0x{k_lo:016x}, 0x{k_hi:016x}}};",
    ]


def c_array(name: str, tables: list[list[int]]) -> list[str]:
    lines = [f"static const uint32_t {name}[{len(tables)}][256] = {{"]
    for t in tables:
        lines.append("    {")
        for i in range(0, 256, 6):
            lines.append("        " + ", ".join(f"0x{v:08x}" for v in t[i:i + 6]) + ",")
        lines.append("    },")
    lines.append("};")
    return lines


def render() -> str:
    t0 = byte_table()
    lines = [
        "/* GENERATED by tools/gen_crc32c_tables.py: do not edit.",
        " * Private to native/src/crc32c.c (constant tables, see the generator's docstring). */",
        "#ifndef SHMB_CRC32C_TABLES_H",
        "#define SHMB_CRC32C_TABLES_H",
        "",
        "#include <stdint.h>",
        "",
        f"#define SHMB_CRC32C_LONG_BYTES {LONG_BYTES}",
        f"#define SHMB_CRC32C_SHORT_BYTES {SHORT_BYTES}",
        "",
    ]
    lines += c_array("shmb_crc32c_slice8", slice8(t0))
    lines.append("")
    lines += c_array("shmb_crc32c_zeros_long", zeros_operator(t0, LONG_BYTES))
    lines.append("")
    lines += c_array("shmb_crc32c_zeros_short", zeros_operator(t0, SHORT_BYTES))
    _check_fold(t0)
    for bits in FOLD_BITS:
        lines.append("")
        lines += c_fold(bits)
    lines += ["", "#endif", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run {pathlib.Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
