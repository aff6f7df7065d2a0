"""Graph walking shared by the passes: subgraphs of control-flow nodes, names in use, module scopes."""

from __future__ import annotations

import ast
from collections.abc import Iterator

import onnx


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of an ``If``/``Loop``/``Scan`` node (none for other nodes)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph below it, depth first."""
    yield graph
    for node in graph.node:
        for g in subgraphs(node):
            yield from graphs(g)


def value_names(graph: onnx.GraphProto) -> Iterator[str]:
    """Names a new value of this graph must not take: initializers, inputs, node outputs."""
    yield from (t.name for t in graph.initializer)
    yield from (v.name for v in graph.input)
    for node in graph.node:
        yield from node.output


def leaf_scope(node: onnx.NodeProto) -> str:
    """The module path in the exporter's name scopes ('' when absent, e.g. inside subgraphs)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return ""
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    return ""


def fresh_name(names: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first not in ``names``; it is added to ``names``."""
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name
