"""Pass: drop the exporter's debug metadata from every node (subgraphs included).

Matches: node ``metadata_props`` holding Python stack traces and FX node dumps, and node doc
strings. Guarantees: the shipped model carries no source-file paths of the exporting machine;
``pkg.torch.onnx.name_scopes`` (the module path of each node) is kept, since quantization passes
use it to map nodes back to torch modules.
"""

from __future__ import annotations

import onnx

from edgegate.onnx_export.passes.attach_functions import iter_nodes

DROPPED_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def strip_debug_metadata(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """``inplace``: change ``model`` itself (no copy of its initializers)."""
    if inplace:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    for node in iter_nodes(out.graph):
        keep = [(p.key, p.value) for p in node.metadata_props if p.key not in DROPPED_KEYS]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
        node.doc_string = ""
    return out
