"""Graph walking shared by the passes: subgraphs of control-flow nodes, names in use, module scopes."""

from __future__ import annotations

import ast
from collections import ChainMap
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


def scoped_graphs(graph: onnx.GraphProto, outer: ChainMap | None = None
                  ) -> Iterator[tuple[onnx.GraphProto, ChainMap]]:
    """(graph, initializers visible in it) for ``graph`` and every subgraph, outer scopes first: an ``If``
    branch sees its own initializers and its parents' (ONNX scoping). Nodes are listed before walking, so a
    caller may edit a graph it was given."""
    visible = (outer if outer is not None else ChainMap()).new_child({t.name: t for t in graph.initializer})
    yield graph, visible
    for node in list(graph.node):
        for g in subgraphs(node):
            yield from scoped_graphs(g, visible)


def scoped_nodes(graph: onnx.GraphProto, outer: ChainMap | None = None
                 ) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto, ChainMap]]:
    """(graph, node, visible initializers) for every node, subgraphs right after the node that holds them."""
    visible = (outer if outer is not None else ChainMap()).new_child({t.name: t for t in graph.initializer})
    for node in list(graph.node):
        yield graph, node, visible
        for g in subgraphs(node):
            yield from scoped_nodes(g, visible)
