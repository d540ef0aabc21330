"""BFV vectors as a dishonest party would craft them: a real ciphertext under item counts of its choosing.

TenSEAL serialises a vector as `BFVVectorProto` (tenseal/proto/tensors.proto:
`repeated uint32 sizes = 1` (packed), `repeated bytes ciphertexts = 2`), and
decrypting one copies as many slots per ciphertext as `sizes` declares
(mor_secure/secagg/aggregation.py, `vector`).
"""

from __future__ import annotations


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if not byte & 0x80:
            return value, at


def ciphertexts_of(serialised: bytes) -> list[bytes]:
    """The serialised ciphertexts (field 2) of a serialised vector."""
    found, at = [], 0
    while at < len(serialised):
        tag, at = _read_varint(serialised, at)
        length, at = _read_varint(serialised, at)  # both fields are length-delimited
        if tag == (2 << 3 | 2):
            found.append(serialised[at:at + length])
        at += length
    return found


def redeclared(serialised: bytes, sizes: list[int], copies: int = 1) -> bytes:
    """The first ciphertext of `serialised`, `copies` times, declaring the item counts `sizes`."""
    (ciphertext, *_) = ciphertexts_of(serialised)
    packed = b"".join(_varint(size) for size in sizes)
    body = b"\x0a" + _varint(len(packed)) + packed if sizes else b""
    return body + (b"\x12" + _varint(len(ciphertext)) + ciphertext) * copies
