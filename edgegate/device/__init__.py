"""Stage 9, device: measure a bundle on an edge device over the network (DESIGN.md §11).

Input (device): ``edgegate device serve`` with a token file and a private work folder; the runtime install
only (numpy + onnxruntime + the served target's runtime). Input (workstation): a bundle directory, the
agent's URL and token. Output: the bundle's ``edgegate.bench`` report, measured on the device, with
``device`` naming the agent that measured it.

- ``protocol.py``: paths, auth header, JSON envelopes, query <-> `BenchConfig`, token files;
- ``transfer.py``: the bundle as a tar stream, and its safe extraction while streaming;
- ``jobs.py``: the work folder (job folders, start-up cleanup) and the measurement queue;
- ``server.py``: the hardened ``http.server`` layer; ``agent.py``: auth, routing, the bench flow;
- ``worker.py``: the measurement process (``edgegate.benchmark.bench`` on the verified upload);
- ``client.py``: ``urllib`` client used by ``bench``/``compare --device`` and ``device info``.
"""

from __future__ import annotations

from edgegate.device.agent import Agent, AgentConfig
from edgegate.device.client import DeviceClient, DeviceTargetError
from edgegate.device.protocol import DeviceError, read_token
from edgegate.device.transfer import TransferError, TransferLimits

__all__ = [
    "Agent", "AgentConfig", "DeviceClient", "DeviceError", "DeviceTargetError", "TransferError", "TransferLimits",
    "read_token",
]
