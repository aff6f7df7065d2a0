"""Pass: drop the exporter's debug metadata from every node (subgraphs included).

Matches: node ``metadata_props`` and node doc strings. The exporter writes, per node, the Python stack
trace, the FX node, the module ``namespace`` and ``class_hierarchy`` (the qualified class of every
enclosing module) and onnxscript's rewrite rule: debug information only, ~80% of the bytes of a small
transformer's model.onnx. Guarantees: the shipped model carries no source-file paths or class dumps of
the exporting machine; only `KEPT_KEYS` survive: ``pkg.torch.onnx.name_scopes`` (the module path of
each node), which the quantization passes use to map nodes back to torch modules (``_graph.leaf_scope``).
"""

from __future__ import annotations

import onnx

from edgegate.onnx_export.passes._graph import copied
from edgegate.onnx_export.passes.attach_functions import iter_nodes

KEPT_KEYS = frozenset({"pkg.torch.onnx.name_scopes"})


def strip_debug_metadata(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """``inplace``: change ``model`` itself (no copy of its initializers)."""
    out = model if inplace else copied(model)
    for node in iter_nodes(out.graph):
        keep = [(p.key, p.value) for p in node.metadata_props if p.key in KEPT_KEYS]
        del node.metadata_props[:]
        for key, value in keep:
            node.metadata_props.add(key=key, value=value)
        node.doc_string = ""
    return out
