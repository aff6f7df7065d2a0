"""The UART-style programming stream ``stream.bin``: a core image as framed commands, and back.

Stage: targets (snn). Input: core image bytes (or, for runs, input spike trains / results). Output:
frames. A frame is

    0xA5 | u8 command | u16 length (LE) | payload[length] | u16 CRC-16/CCITT-FALSE of command+length+payload

Host -> device: RESET (no payload); BEGIN (u16 image version, u16 sections, u32 image size); one
WRITE_* frame per chunk of a section (u16 section index, u32 byte offset, chunk of <= 1024 bytes;
WRITE_META/IOMAP/GROUPS/SYNAPSES/ENABLES/EXIT by section kind); COMMIT (u32 CRC32 of the whole
image); RUN (u16 timesteps, u8 flags: bit 0 early decision); INPUT_SPIKES (u16 step, bitmap of the
input neurons, LSB first). Device -> host: SPIKES (u16 step, u16 group, bitmap), EXIT (u16 sample,
u16 step, u16 class), STATS (u32 steps, u64 spikes, u64 synaptic events, u64 neuron updates).

`program_stream` turns an image into RESET, BEGIN, WRITE_*..., COMMIT; `image_from_stream` rebuilds
the image and checks the COMMIT CRC, so image -> stream -> image is byte-identical. Parsing is
strict: a bad sync byte, CRC-16, length, command or order raises `ModelFormatError` in one line,
before anything is returned. numpy only.
"""

from __future__ import annotations

import dataclasses
import struct
from enum import IntEnum

import numpy as np

from edgegate.errors import ModelFormatError
from edgegate.snn.image import VERSION, Kind, assemble, crc32, read_image, split_image

SYNC = 0xA5
CHUNK = 1024
FRAME_HEAD = struct.Struct("<BBH")
WRITE_HEAD = struct.Struct("<HI")
BEGIN = struct.Struct("<HHI")


class Cmd(IntEnum):
    RESET = 0x01
    BEGIN = 0x02
    COMMIT = 0x03
    WRITE_META = 0x10
    WRITE_IOMAP = 0x11
    WRITE_GROUPS = 0x12
    WRITE_SYNAPSES = 0x13
    WRITE_ENABLES = 0x14
    WRITE_EXIT = 0x15
    RUN = 0x20
    INPUT_SPIKES = 0x21
    SPIKES = 0x80
    EXIT = 0x81
    STATS = 0x82


WRITE_FOR_KIND = {Kind.META: Cmd.WRITE_META, Kind.IOMAP: Cmd.WRITE_IOMAP, Kind.GROUP: Cmd.WRITE_GROUPS,
                  Kind.SYNAPSE: Cmd.WRITE_SYNAPSES, Kind.ENABLE: Cmd.WRITE_ENABLES, Kind.EXIT: Cmd.WRITE_EXIT}
KIND_FOR_WRITE = {c: k for k, c in WRITE_FOR_KIND.items()}


@dataclasses.dataclass(frozen=True)
class Frame:
    cmd: Cmd
    payload: bytes


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor)."""
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ b]
    return crc


def encode_frame(cmd: int, payload: bytes = b"") -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds 65535")
    body = struct.pack("<BH", cmd, len(payload)) + payload
    return bytes([SYNC]) + body + struct.pack("<H", crc16(body))


def parse_frames(data: bytes, where: str = "stream.bin") -> list[Frame]:
    """Every frame of ``data``; ModelFormatError at the first defect (with its byte offset)."""
    data, frames, pos = bytes(data), [], 0
    while pos < len(data):
        if len(data) - pos < FRAME_HEAD.size + 2:
            raise ModelFormatError(f"{where}: truncated frame at byte {pos}; the stream is cut short")
        sync, cmd, length = FRAME_HEAD.unpack_from(data, pos)
        if sync != SYNC:
            raise ModelFormatError(f"{where}: byte {pos} is 0x{sync:02x}, not the sync byte 0x{SYNC:02x}; corrupt")
        end = pos + FRAME_HEAD.size + length
        if end + 2 > len(data):
            raise ModelFormatError(f"{where}: frame at byte {pos} needs {length} payload bytes; the stream is cut "
                                   "short")
        (crc,) = struct.unpack_from("<H", data, end)
        if crc16(data[pos + 1:end]) != crc:
            raise ModelFormatError(f"{where}: CRC-16 mismatch in the frame at byte {pos}; the stream is corrupt")
        if cmd not in Cmd._value2member_map_:
            raise ModelFormatError(f"{where}: unknown command 0x{cmd:02x} at byte {pos}; corrupt or newer edgegate")
        frames.append(Frame(Cmd(cmd), data[pos + FRAME_HEAD.size:end]))
        pos = end + 2
    return frames


def program_stream(image: bytes, where: str = "core.egc") -> bytes:
    """RESET, BEGIN, the image's sections as WRITE_* chunks, COMMIT. Checks the image first."""
    read_image(image, where)
    parts = split_image(image, where)
    out = [encode_frame(Cmd.RESET), encode_frame(Cmd.BEGIN, BEGIN.pack(VERSION, len(parts), len(image)))]
    for n, (kind, _index, payload) in enumerate(parts):
        for off in range(0, max(len(payload), 1), CHUNK):
            out.append(encode_frame(WRITE_FOR_KIND[Kind(kind)], WRITE_HEAD.pack(n, off) + payload[off:off + CHUNK]))
    out.append(encode_frame(Cmd.COMMIT, struct.pack("<I", crc32(image))))
    return b"".join(out)


def image_from_stream(stream: bytes, where: str = "stream.bin") -> bytes:
    """Rebuild the core image a programming stream writes; ModelFormatError if it is not a whole, valid one."""
    frames = parse_frames(stream, where)
    if len(frames) < 3 or frames[0].cmd is not Cmd.RESET or frames[1].cmd is not Cmd.BEGIN \
            or frames[-1].cmd is not Cmd.COMMIT:
        raise ModelFormatError(f"{where}: a programming stream starts RESET, BEGIN and ends COMMIT; this one does "
                               "not (truncated or not a programming stream)")
    if len(frames[0].payload) or len(frames[1].payload) != BEGIN.size or len(frames[-1].payload) != 4:
        raise ModelFormatError(f"{where}: RESET/BEGIN/COMMIT payload has the wrong length; corrupt")
    version, count, size = BEGIN.unpack(frames[1].payload)
    if version != VERSION:
        raise ModelFormatError(f"{where}: stream programs core image version {version}, this edgegate reads "
                               f"version {VERSION}; re-export the bundle with this edgegate")
    kinds: list[int] = []
    payloads: list[bytearray] = []
    for i, frame in enumerate(frames[2:-1], start=2):
        kind = KIND_FOR_WRITE.get(frame.cmd)
        if kind is None or len(frame.payload) < WRITE_HEAD.size:
            raise ModelFormatError(f"{where}: frame {i} ({frame.cmd.name}) is not a section write; corrupt")
        n, off = WRITE_HEAD.unpack_from(frame.payload)
        if n == len(payloads):
            kinds.append(kind)
            payloads.append(bytearray())
        if n != len(payloads) - 1 or kinds[n] != kind or off != len(payloads[n]):
            raise ModelFormatError(f"{where}: frame {i} writes section {n} at offset {off} out of order; corrupt")
        payloads[n] += frame.payload[WRITE_HEAD.size:]
    if len(payloads) != count:
        raise ModelFormatError(f"{where}: BEGIN announces {count} sections, the stream writes {len(payloads)}")
    index: dict[int, int] = {}
    parts = []
    for kind, payload in zip(kinds, payloads, strict=True):
        parts.append((kind, index.get(kind, 0), bytes(payload)))
        index[kind] = index.get(kind, 0) + 1
    image = assemble(parts, version)
    if len(image) != size or crc32(image) != struct.unpack("<I", frames[-1].payload)[0]:
        raise ModelFormatError(f"{where}: the rebuilt image does not match COMMIT's size/CRC32; corrupt")
    read_image(image, where)
    return image


# ------------------------------------------------------------------------------------------ run frames


def input_frames(spikes: np.ndarray, timesteps: int, early: bool) -> bytes:
    """Host frames for one sample: RUN then one INPUT_SPIKES per step (bool spikes [T, n_in])."""
    out = [encode_frame(Cmd.RUN, struct.pack("<HB", timesteps, int(early)))]
    for t in range(timesteps):
        out.append(encode_frame(Cmd.INPUT_SPIKES, struct.pack("<H", t)
                                + np.packbits(spikes[t], bitorder="little").tobytes()))
    return b"".join(out)


def read_input_frames(data: bytes, neurons: int, where: str = "input frames") -> tuple[np.ndarray, int, bool]:
    """Inverse of `input_frames`: (spikes bool [T, neurons], timesteps, early)."""
    frames = parse_frames(data, where)
    if not frames or frames[0].cmd is not Cmd.RUN or len(frames[0].payload) != 3:
        raise ModelFormatError(f"{where}: input frames start with RUN (u16 timesteps, u8 flags)")
    timesteps, flags = struct.unpack("<HB", frames[0].payload)
    width = (neurons + 7) // 8
    if len(frames) != timesteps + 1 or flags > 1:
        raise ModelFormatError(f"{where}: RUN announces {timesteps} steps, {len(frames) - 1} INPUT_SPIKES follow")
    spikes = np.zeros((timesteps, neurons), bool)
    for t, frame in enumerate(frames[1:]):
        if frame.cmd is not Cmd.INPUT_SPIKES or len(frame.payload) != 2 + width \
                or struct.unpack_from("<H", frame.payload)[0] != t:
            raise ModelFormatError(f"{where}: frame {t + 1} is not INPUT_SPIKES for step {t} of {neurons} neurons")
        bits = np.unpackbits(np.frombuffer(frame.payload[2:], np.uint8), bitorder="little")
        if bits[neurons:].any():
            raise ModelFormatError(f"{where}: INPUT_SPIKES {t} has padding bits set; corrupt")
        spikes[t] = bits[:neurons].astype(bool)
    return spikes, timesteps, bool(flags)


def spike_frame(step: int, group: int, spikes: np.ndarray) -> bytes:
    """Device -> host: one group's spikes (bool [n]) at ``step``."""
    return encode_frame(Cmd.SPIKES, struct.pack("<HH", step, group) + np.packbits(spikes, bitorder="little").tobytes())


def exit_frame(sample: int, step: int, cls: int) -> bytes:
    return encode_frame(Cmd.EXIT, struct.pack("<HHH", sample, step, cls))


def stats_frame(steps: int, spikes: int, synops: int, updates: int) -> bytes:
    return encode_frame(Cmd.STATS, struct.pack("<IQQQ", steps, spikes, synops, updates))
