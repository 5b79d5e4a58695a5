"""Decode one window slot of a Blosc chunk without decoding the rest of the chunk.

Under the causal slot policy every frame comes from a different window, so a plain reader
decodes a whole [8, Hf, Wf, C] chunk (~68 MB for VGGT) to keep one slot. Blosc stores a
chunk as independently compressed blocks, and c-blosc2's `blosc2_getitem` decodes only the
blocks that hold a byte range (it reads Blosc1 chunks, as numcodecs writes them). The
`blosc2` wheel ships libblosc2; we call that one function through ctypes. Measured on one
core here: the last slot of a 28x37x2048 fp32 window 16x faster than the whole chunk,
bit-identical. Only that slot's compressed blocks are read from disk, too. Used only for
zarr format 2 arrays with a lone Blosc compressor, no filters and C order; anything else
falls back to zarr's full decode.
"""

from __future__ import annotations

import ctypes
import importlib.util
import struct
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numcodecs
import numpy as np
import zarr

_MEMCPYED = 0x02  # Blosc header flag: the chunk holds raw, uncompressed bytes


@cache
def _getitem():  # noqa: ANN202 - a ctypes function
    """`blosc2_getitem` from the blosc2 wheel's libblosc2, or None when not installed."""
    spec = importlib.util.find_spec("blosc2")
    if spec is None or not spec.submodule_search_locations:
        return None
    library = Path(spec.submodule_search_locations[0]) / "lib" / "libblosc2.so"
    if not library.is_file():
        return None
    lib = ctypes.CDLL(str(library))
    lib.blosc2_init()
    # int blosc2_getitem(const void* src, int32_t srcsize, int start, int nitems,
    #                    void* dest, int32_t destsize): a fresh context per call, thread-safe
    fn = lib.blosc2_getitem
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int32,
    ]
    fn.restype = ctypes.c_int
    return fn


class SlotReader:
    """Reads slots [first, last] of one chunk of a windowed array [W, Tw, Hf, Wf, C]."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.array_dir = Path(array.store_path.store.root) / array.store_path.path
        self.separator = getattr(array.metadata, "dimension_separator", ".") or "."
        self.frame_shape = tuple(array.shape[2:])
        self.frame_bytes = int(np.prod(self.frame_shape)) * array.dtype.itemsize

    @staticmethod
    def supports(array: zarr.Array) -> bool:
        metadata = array.metadata
        return (
            _getitem() is not None
            and metadata.zarr_format == 2
            and not array.filters
            and len(array.compressors) == 1
            and isinstance(array.compressors[0], numcodecs.Blosc)
            and getattr(metadata, "order", "C") == "C"
            and tuple(array.chunks) == (1, *array.shape[1:])
        )

    def read(self, window: int, first: int, last: int) -> np.ndarray:
        """(last - first + 1, Hf, Wf, C): those slots of the window, reading and decoding only
        the compressed blocks that hold them."""
        out = np.empty((last - first + 1, *self.frame_shape), dtype=self.array.dtype)
        key = self.separator.join([str(window)] + ["0"] * (self.array.ndim - 1))
        path = self.array_dir / key
        if not path.is_file():  # never written: zarr's fill value
            out.fill(self.array.fill_value or 0)
            return out
        start_byte = first * self.frame_bytes
        with open(path, "rb") as f:
            chunk = self._read_blocks(f, start_byte, start_byte + out.nbytes)
        typesize = int(chunk[3])  # items are counted in the header's typesize
        got = _getitem()(
            chunk.ctypes.data,
            len(chunk),
            start_byte // typesize,
            out.nbytes // typesize,
            out.ctypes.data,
            out.nbytes,
        )
        if got != out.nbytes:
            raise RuntimeError(f"blosc2_getitem returned {got} for {out.nbytes} bytes of chunk {key}")
        return out

    @staticmethod
    def _read_blocks(f: BinaryIO, lo: int, hi: int) -> np.ndarray:
        """The chunk as a buffer of its full compressed size in which only the header, the
        block offsets and the blocks covering uncompressed bytes [lo, hi) are read from disk:
        a VGGT window is ~60 MB compressed, one slot of it ~8 MB. getitem touches nothing else.

        Blosc1 layout: 16-byte header (flags at 2, typesize at 3, then int32 nbytes,
        blocksize, cbytes), then int32 start offsets of the nblocks blocks, then the blocks
        in order (or, when flags say memcpyed, the raw bytes with no offsets)."""
        header = f.read(16)
        nbytes, blocksize, cbytes = struct.unpack("<iii", header[4:16])
        buf = np.empty(cbytes, dtype=np.uint8)  # untouched pages are never read nor faulted in
        buf[:16] = np.frombuffer(header, dtype=np.uint8)
        if header[2] & _MEMCPYED:
            begin, end = 16 + lo, 16 + hi
        else:
            nblocks = -(-nbytes // blocksize)
            offsets_raw = f.read(4 * nblocks)
            buf[16 : 16 + 4 * nblocks] = np.frombuffer(offsets_raw, dtype=np.uint8)
            offsets = np.frombuffer(offsets_raw, dtype="<i4")
            first_block, last_block = lo // blocksize, (hi - 1) // blocksize
            begin = int(offsets[first_block])
            end = int(offsets[last_block + 1]) if last_block + 1 < nblocks else cbytes
        f.seek(begin)
        f.readinto(memoryview(buf)[begin:end])
        return buf
