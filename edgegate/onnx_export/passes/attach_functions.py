"""Pass: carry every ``edgegate`` op used by a graph as a model-local function.

Matches: nodes of domain ``edgegate`` anywhere in the model, subgraphs of ``If``/``Loop``/``Scan``
included. Guarantees: each such op type has exactly one FunctionProto in ``model.functions`` and
the model imports the ``edgegate`` opset at the catalog version, so any ONNX runtime can run it.
Unknown op types of the domain raise ``ExportError``.
"""

from __future__ import annotations

import onnx

from edgegate.errors import ExportError
from edgegate.onnx_export.passes._graph import copied, subgraphs
from edgegate.ops import CATALOG, DOMAIN, DOMAIN_VERSION
from edgegate.ops.onnx_function import function_proto


def iter_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from iter_nodes(g)


def attach_functions(model: onnx.ModelProto, inplace: bool = False) -> onnx.ModelProto:
    """``model`` with the FunctionProto of each ``edgegate`` op it uses; ``inplace``: ``model`` itself is changed
    (no copy of its initializers: the exporter's fresh proto of a large model)."""
    out = model if inplace else copied(model)
    used = sorted({n.op_type for n in iter_nodes(out.graph) if n.domain == DOMAIN})
    unknown = [t for t in used if t not in CATALOG]
    if unknown:
        raise ExportError(f"ONNX graph uses unknown {DOMAIN} ops {unknown}; known: {sorted(CATALOG)}")
    have = {(f.domain, f.name) for f in out.functions}
    for op_type in used:
        if (DOMAIN, op_type) not in have:
            out.functions.append(function_proto(op_type))
    imports = {o.domain: o for o in out.opset_import}
    if used and DOMAIN not in imports:
        out.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return out
