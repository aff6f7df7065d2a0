"""Fuzz the snn core image and stream parsers: any byte string is a valid parse or an EdgegateError.

A short run by default (CI); ``EDGEGATE_FUZZ_EXAMPLES=100000 python -m pytest tests/fuzz/test_fuzz_snn.py``
for a long one. Inputs are random bytes, mutations of valid images/streams (flips, cuts, splices),
and mutations *behind* valid CRCs (sections re-assembled after a payload is damaged), which is what
reaches the decoders past the checksums.
"""

from __future__ import annotations

import numpy as np
from _fuzz import FUZZ, expect_edgegate_error, framed, mutated
from hypothesis import given
from hypothesis import strategies as st

from edgegate.snn.image import assemble, read_image, split_image, write_image
from edgegate.snn.network import Encoder, ExitPolicy, Group, Network, SynapseFormat
from edgegate.snn.stream import encode_frame, image_from_stream, parse_frames, program_stream, read_input_frames


def _network() -> Network:
    rng = np.random.default_rng(0)
    groups, fan_in = [], 6
    for k, (n, fmt) in enumerate([(5, SynapseFormat.DENSE), (4, SynapseFormat.TERNARY), (3, SynapseFormat.CSR)]):
        w = rng.integers(-1, 2, (n, fan_in)) if fmt is SynapseFormat.TERNARY else rng.integers(-9, 10, (n, fan_in))
        groups.append(Group(f"g{k}", w.astype(np.int8), rng.integers(-50, 50, n).astype(np.int32),
                            rng.integers(1, 500, n).astype(np.int32), np.zeros(n, np.int32), rng.random(n) < 0.8,
                            fmt=fmt, scale=1.5))
        fan_in = n
    return Network(Encoder(6, 1.0), tuple(groups), timesteps=32, exit=ExitPolicy(True, 3, 4))


IMAGE = write_image(_network(), {"input_name": "x", "input_shape": [6], "output_names": ["y"], "exit_index": 0})
STREAM = program_stream(IMAGE)
PARTS = split_image(IMAGE)




@FUZZ
@given(framed([IMAGE]))
def test_image_parser_never_crashes(data):
    expect_edgegate_error(read_image, data)


@FUZZ
@given(st.integers(0, len(PARTS) - 1), st.data())
def test_image_decoders_behind_valid_crcs(index, data):
    kind, idx, payload = PARTS[index]
    damaged = data.draw(mutated([payload]))
    kind = data.draw(st.sampled_from([kind, kind, data.draw(st.integers(0, 8))]))
    parts = [*PARTS[:index], (kind, idx, damaged), *PARTS[index + 1:]]
    expect_edgegate_error(read_image, assemble(parts))


@FUZZ
@given(framed([STREAM]))
def test_stream_parser_never_crashes(data):
    expect_edgegate_error(image_from_stream, data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=12))
def test_well_framed_garbage_is_refused_cleanly(frames):
    data = b"".join(encode_frame(c, p) for c, p in frames)
    expect_edgegate_error(parse_frames, data)
    expect_edgegate_error(image_from_stream, data)
    expect_edgegate_error(read_input_frames, data, 6)


def test_valid_inputs_still_parse():
    assert read_image(IMAGE).network.groups[2].fmt is SynapseFormat.CSR
    assert image_from_stream(STREAM) == IMAGE
