"""The core image ``core.egc``: a `Network` as the bytes a neuromorphic core is programmed with.

Stage: targets (snn). Input: a `Network` plus host-side IO facts (input name/shape, output names).
Output: bytes, and back. Little-endian throughout; layout (docs/snn.md has it byte by byte):

    header  16 B   magic "EGCI", u16 version, u16 section count, u32 file size, u32 CRC32 of the
                   header's first 12 bytes followed by the section table
    table   16 B/section: u16 kind, u16 index, u32 offset, u32 length, u32 CRC32 of the payload
    payloads       contiguous, in table order: META, IOMAP, GROUP x n, SYNAPSE x n, ENABLE x n, EXIT

`read_image` checks every length, CRC and value before it builds anything, and raises
`ModelFormatError` (one line naming the file, section and field) on corrupt, truncated or
foreign input: a reader never returns half a network. The layout is canonical (one byte string per
network), which is what lets image -> stream -> image round-trip byte for byte. numpy only.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from enum import IntEnum
from typing import Any

import numpy as np

from edgegate.errors import EdgegateError, ModelFormatError
from edgegate.ops.packing import pack_ternary
from edgegate.snn.network import Encoder, ExitPolicy, Group, Network, SynapseFormat

MAGIC = b"EGCI"
VERSION = 1
HEADER = struct.Struct("<4sHHII")
ENTRY = struct.Struct("<HHIII")
GROUP_HEAD = struct.Struct("<IBBBB")  # n, k_syn, k_mem, refractory, flags (0)
SYN_HEAD = struct.Struct("<HBBII")  # group index, format, reserved (0), n_out, n_in
ENABLE_HEAD = struct.Struct("<HHI")  # group index, reserved (0), n
IOMAP = struct.Struct("<IBBHIfHH")  # features, signed, reserved, reserved, levels, scale, output group, outputs
EXIT = struct.Struct("<BBHHH")  # enabled, reserved, margin, min_steps, timesteps
MAX_SECTIONS = 4 * 1024
MAX_NEURONS = 1 << 20
MAX_SYNAPSES = 1 << 26  # per projection: a CSR header must not make a small file allocate gigabytes


class Kind(IntEnum):
    META = 1
    IOMAP = 2
    GROUP = 3
    SYNAPSE = 4
    ENABLE = 5
    EXIT = 6


@dataclasses.dataclass(frozen=True)
class CoreImage:
    """A parsed image: the network and the host-side IO facts from META."""

    network: Network
    io: dict[str, Any]  # input_name, input_shape, output_names


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------ writing


def sections(net: Network, io: dict[str, Any]) -> list[tuple[Kind, int, bytes]]:
    """(kind, index, payload) of every section, in canonical order."""
    meta = {"io": io, "frac_bits": net.frac_bits, "groups": [{"name": g.name, "scale": g.scale} for g in net.groups],
            "meta": net.meta}
    out = [(Kind.META, 0, json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())]
    e = net.encoder
    out.append((Kind.IOMAP, 0, IOMAP.pack(e.features, int(e.signed), 0, 0, e.levels, e.scale,
                                          len(net.groups) - 1, net.output.size)))
    for k, g in enumerate(net.groups):
        out.append((Kind.GROUP, k, GROUP_HEAD.pack(g.size, g.k_syn, g.k_mem, g.refractory, 0)
                    + g.threshold.astype("<i4").tobytes() + g.bias.astype("<i4").tobytes()
                    + g.v_init.astype("<i4").tobytes()))
    for k, g in enumerate(net.groups):
        out.append((Kind.SYNAPSE, k, SYN_HEAD.pack(k, int(g.fmt), 0, g.size, g.fan_in) + _synapse_payload(g)))
    for k, g in enumerate(net.groups):
        bits = np.packbits(g.enable, bitorder="little").tobytes()
        out.append((Kind.ENABLE, k, ENABLE_HEAD.pack(k, 0, g.size) + bits))
    out.append((Kind.EXIT, 0, EXIT.pack(int(net.exit.enabled), 0, net.exit.margin, net.exit.min_steps, net.timesteps)))
    return out


def _synapse_payload(g: Group) -> bytes:
    if g.fmt is SynapseFormat.TERNARY:

        return pack_ternary(g.weight).tobytes()
    if g.fmt is SynapseFormat.CSR:
        rows, cols = np.nonzero(g.weight)
        indptr = np.searchsorted(rows, np.arange(g.size + 1)).astype("<u4")
        return (struct.pack("<I", len(cols)) + indptr.tobytes() + cols.astype("<u4").tobytes()
                + g.weight[rows, cols].astype(np.int8).tobytes())
    return g.weight.astype(np.int8).tobytes()


def assemble(parts: list[tuple[int, int, bytes]], version: int = VERSION) -> bytes:
    """Header + table + payloads for (kind, index, payload) parts (the canonical layout)."""
    offset = HEADER.size + ENTRY.size * len(parts)
    table = b""
    for kind, index, payload in parts:
        table += ENTRY.pack(kind, index, offset, len(payload), crc32(payload))
        offset += len(payload)
    head = struct.pack("<4sHHI", MAGIC, version, len(parts), offset)
    return head + struct.pack("<I", crc32(head + table)) + table + b"".join(p for _, _, p in parts)


def write_image(net: Network, io: dict[str, Any]) -> bytes:
    return assemble(sections(net, io))


# ------------------------------------------------------------------------------------------ reading


def split_image(data: bytes, where: str = "core.egc") -> list[tuple[int, int, bytes]]:
    """Check header, table and CRCs; return the (kind, index, payload) parts. Raises ModelFormatError."""
    data = bytes(data)
    if len(data) < HEADER.size:
        raise ModelFormatError(f"{where}: {len(data)} bytes is shorter than the {HEADER.size}-byte header; "
                               "the image is truncated, re-export the bundle")
    magic, version, count, size, head_crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ModelFormatError(f"{where}: not an edgegate core image (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ModelFormatError(f"{where}: core image version {version}, this edgegate reads version {VERSION}; "
                               "re-export the bundle with this edgegate")
    if size != len(data):
        raise ModelFormatError(f"{where}: header says {size} bytes, the file has {len(data)}; it is truncated or "
                               "padded, re-export the bundle")
    if not 1 <= count <= MAX_SECTIONS or HEADER.size + ENTRY.size * count > size:
        raise ModelFormatError(f"{where}: section count {count} does not fit the file; the image is corrupt")
    table = data[HEADER.size:HEADER.size + ENTRY.size * count]
    if crc32(data[:12] + table) != head_crc:
        raise ModelFormatError(f"{where}: header CRC32 mismatch; the image is corrupt, re-export the bundle")
    parts, offset = [], HEADER.size + len(table)
    for n in range(count):
        kind, index, off, length, crc = ENTRY.unpack_from(table, n * ENTRY.size)
        name = Kind(kind).name if kind in Kind._value2member_map_ else f"kind {kind}"
        if off != offset or off + length > size:
            raise ModelFormatError(f"{where}: section {n} ({name}) at offset {off} length {length} is out of place "
                                   "(sections are contiguous); the image is corrupt")
        payload = data[off:off + length]
        if crc32(payload) != crc:
            raise ModelFormatError(f"{where}: section {n} ({name} {index}) CRC32 mismatch; the image is corrupt, "
                                   "re-export the bundle")
        parts.append((kind, index, payload))
        offset += length
    if offset != size:
        raise ModelFormatError(f"{where}: {size - offset} bytes after the last section; the image is corrupt")
    return parts


def read_image(data: bytes, where: str = "core.egc") -> CoreImage:
    """Parse and fully validate an image (see module doc); ModelFormatError on any defect."""
    parts = split_image(data, where)
    try:
        return _decode(parts, where)
    except ModelFormatError:
        raise
    except (EdgegateError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError,
            struct.error) as e:
        text = " ".join(str(e).split())[:200]
        raise ModelFormatError(f"{where}: invalid content ({text}); re-export the bundle") from None


def _expect(parts: list, kinds: list[tuple[Kind, int]], where: str) -> None:
    got = [(k, i) for k, i, _ in parts]
    if got != [(int(k), i) for k, i in kinds]:
        raise ModelFormatError(f"{where}: sections {got[:8]} are not in the canonical order "
                               "META, IOMAP, GROUP*, SYNAPSE*, ENABLE*, EXIT; the image is corrupt")


def _decode(parts: list[tuple[int, int, bytes]], where: str) -> CoreImage:
    n = (len(parts) - 3) // 3
    if n < 1 or len(parts) != 3 * n + 3:
        raise ModelFormatError(f"{where}: {len(parts)} sections cannot hold META, IOMAP, n x (GROUP, SYNAPSE, "
                               "ENABLE) and EXIT; the image is corrupt")
    order = [(Kind.META, 0), (Kind.IOMAP, 0), *[(Kind.GROUP, k) for k in range(n)],
             *[(Kind.SYNAPSE, k) for k in range(n)], *[(Kind.ENABLE, k) for k in range(n)], (Kind.EXIT, 0)]
    _expect(parts, order, where)
    meta = json.loads(parts[0][2].decode("utf-8"))
    if not isinstance(meta, dict) or not isinstance(meta.get("groups"), list) or len(meta["groups"]) != n:
        raise ModelFormatError(f"{where}: META does not describe {n} groups; the image is corrupt")
    features, signed, _, _, levels, scale, out_group, n_outputs = _unpack(IOMAP, parts[1][2], "IOMAP", where)
    encoder = Encoder(features=features, scale=float(scale), signed=bool(signed), levels=levels)
    groups, fan_in = [], encoder.neurons
    for k in range(n):
        g_payload, s_payload, e_payload = parts[2 + k][2], parts[2 + n + k][2], parts[2 + 2 * n + k][2]
        size, k_syn, k_mem, refractory, _ = _unpack(GROUP_HEAD, g_payload[:GROUP_HEAD.size], f"GROUP {k}", where)
        if size > MAX_NEURONS or len(g_payload) != GROUP_HEAD.size + 12 * size:
            raise ModelFormatError(f"{where}: GROUP {k} has {len(g_payload)} bytes for {size} neurons; corrupt")
        arrays = np.frombuffer(g_payload, "<i4", offset=GROUP_HEAD.size).reshape(3, size).astype(np.int32)
        weight, fmt = _read_synapses(s_payload, k, size, fan_in, where)
        enable = _read_enable(e_payload, k, size, where)
        info = meta["groups"][k]
        groups.append(Group(name=str(info["name"]), weight=weight, bias=arrays[1].copy(), threshold=arrays[0].copy(),
                            v_init=arrays[2].copy(), enable=enable, fmt=fmt, k_syn=k_syn, k_mem=k_mem,
                            refractory=refractory, scale=float(info["scale"])))
        fan_in = size
    if out_group != n - 1 or n_outputs != groups[-1].size:
        raise ModelFormatError(f"{where}: IOMAP names output group {out_group} of {n_outputs} neurons; corrupt")
    enabled, _, margin, min_steps, timesteps = _unpack(EXIT, parts[-1][2], "EXIT", where)
    if enabled not in (0, 1):
        raise ModelFormatError(f"{where}: EXIT enabled flag is {enabled}, not 0 or 1; the image is corrupt")
    net = Network(encoder=encoder, groups=tuple(groups), frac_bits=int(meta["frac_bits"]), timesteps=timesteps,
                  exit=ExitPolicy(bool(enabled), margin, min_steps), meta=dict(meta.get("meta") or {}))
    io = meta.get("io")
    if not (isinstance(io, dict) and isinstance(io.get("input_name"), str)
            and isinstance(io.get("input_shape"), list) and all(type(d) is int and d > 0 for d in io["input_shape"])
            and int(np.prod(io["input_shape"])) == features
            and isinstance(io.get("output_names"), list) and io["output_names"]
            and all(isinstance(n, str) for n in io["output_names"]) and type(io.get("exit_index", 0)) is int):
        raise ModelFormatError(f"{where}: META io (input name/shape, output names) is missing or does not fit "
                               "the network; the image is corrupt")
    return CoreImage(net, io)


def _unpack(layout: struct.Struct, payload: bytes, name: str, where: str) -> tuple:
    if len(payload) != layout.size:
        raise ModelFormatError(f"{where}: {name} has {len(payload)} bytes, expected {layout.size}; corrupt")
    return layout.unpack(payload)


def _read_synapses(payload: bytes, k: int, n_out: int, n_in: int, where: str) -> tuple[np.ndarray, SynapseFormat]:
    name = f"SYNAPSE {k}"
    index, fmt, _, rows, cols = _unpack(SYN_HEAD, payload[:SYN_HEAD.size], name, where)
    if index != k or rows != n_out or cols != n_in:
        raise ModelFormatError(f"{where}: {name} is [{rows}, {cols}] for group {index}, expected [{n_out}, {n_in}] "
                               f"for group {k}; corrupt")
    body = payload[SYN_HEAD.size:]
    if rows * cols > MAX_SYNAPSES:
        raise ModelFormatError(f"{where}: {name} is [{rows}, {cols}], over {MAX_SYNAPSES} synapses; corrupt")
    if fmt == SynapseFormat.DENSE:
        if len(body) != rows * cols:
            raise ModelFormatError(f"{where}: {name} dense needs {rows * cols} bytes, has {len(body)}; corrupt")
        return np.frombuffer(body, np.int8).reshape(rows, cols).copy(), SynapseFormat.DENSE
    if fmt == SynapseFormat.TERNARY:
        per_row = (cols + 3) // 4
        if len(body) != rows * per_row:
            raise ModelFormatError(f"{where}: {name} ternary needs {rows * per_row} bytes, has {len(body)}; corrupt")
        packed = np.frombuffer(body, np.uint8).reshape(rows, per_row)
        codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(rows, -1)
        if (codes == 2).any() or (codes[:, cols:] != 0).any():
            raise ModelFormatError(f"{where}: {name} has invalid 2-bit codes (0b10 or non-zero padding); corrupt")
        lut = np.array([0, 1, 0, -1], np.int8)
        return lut[codes[:, :cols]], SynapseFormat.TERNARY
    if fmt == SynapseFormat.CSR:
        return _read_csr(body, name, rows, cols, where), SynapseFormat.CSR
    raise ModelFormatError(f"{where}: {name} has unknown synapse format {fmt}; corrupt or newer edgegate")


def _read_csr(body: bytes, name: str, rows: int, cols: int, where: str) -> np.ndarray:
    if len(body) < 4 + 4 * (rows + 1):
        raise ModelFormatError(f"{where}: {name} CSR is truncated; corrupt")
    nnz = struct.unpack_from("<I", body)[0]
    if len(body) != 4 + 4 * (rows + 1) + 5 * nnz or nnz > rows * cols:
        raise ModelFormatError(f"{where}: {name} CSR length does not match its {nnz} non-zeros; corrupt")
    indptr = np.frombuffer(body, "<u4", rows + 1, 4).astype(np.int64)
    idx = np.frombuffer(body, "<u4", nnz, 4 + 4 * (rows + 1)).astype(np.int64)
    values = np.frombuffer(body, np.int8, nnz, 4 + 4 * (rows + 1) + 4 * nnz)
    if indptr[0] != 0 or indptr[-1] != nnz or (np.diff(indptr) < 0).any():
        raise ModelFormatError(f"{where}: {name} CSR row pointers are not 0..{nnz} ascending; corrupt")
    row_of = np.repeat(np.arange(rows), np.diff(indptr))
    keys = row_of * cols + idx
    if (idx >= cols).any() or (np.diff(keys) <= 0).any() or (values == 0).any():
        raise ModelFormatError(f"{where}: {name} CSR columns out of range, unsorted, repeated or zero; corrupt")
    w = np.zeros((rows, cols), np.int8)
    w[row_of, idx] = values
    return w


def _read_enable(payload: bytes, k: int, n: int, where: str) -> np.ndarray:
    index, _, size = _unpack(ENABLE_HEAD, payload[:ENABLE_HEAD.size], f"ENABLE {k}", where)
    bits = payload[ENABLE_HEAD.size:]
    if index != k or size != n or len(bits) != (n + 7) // 8:
        raise ModelFormatError(f"{where}: ENABLE {k} is for group {index} of {size} neurons in {len(bits)} bytes, "
                               f"expected group {k} of {n}; corrupt")
    enable = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
    if enable[n:].any():
        raise ModelFormatError(f"{where}: ENABLE {k} has padding bits set; corrupt")
    return enable[:n].astype(bool)
