"""Graph plumbing shared by the passes: walking subgraphs (with the initializers each sees), names in use, module
scopes, replacing or inserting nodes in place, removing initializers and functions nothing reads any more."""

from __future__ import annotations

import ast
from collections import ChainMap
from collections.abc import Container, Iterator, Sequence

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


def names_in_use(graph: onnx.GraphProto) -> set[str]:
    """Every value name of ``graph`` and its subgraphs: what `fresh_name` must avoid in a pass over the model."""
    return {n for g in graphs(graph) for n in value_names(g)}


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


def replace_node(graph: onnx.GraphProto, node: onnx.NodeProto, new: Sequence[onnx.NodeProto]) -> None:
    """Put ``new`` where ``node`` stands, in order (nodes stay topologically sorted); ``node`` leaves the graph."""
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for i, n in enumerate(new):
        graph.node.insert(at + i, n)


def insert_nodes(graph: onnx.GraphProto, anchor: onnx.NodeProto, new: Sequence[onnx.NodeProto], *,
                 after: bool = False) -> None:
    """Put ``new`` right before ``anchor`` (its inputs' producers), or right after it (its output's readers)."""
    at = list(graph.node).index(anchor) + (1 if after else 0)
    for i, n in enumerate(new):
        graph.node.insert(at + i, n)


def drop_unused_initializers(model: onnx.ModelProto, candidates: Container[str] | None = None) -> None:
    """Remove the initializers no node of any graph reads and no graph returns (of ``candidates`` only, when
    given). An initializer that is also a graph input stays: it is an overridable default, not dead weight."""
    every = list(graphs(model.graph))
    # Every graph's outputs count as read: a subgraph (an If branch) may return an initializer directly.
    used = {i for g in every for n in g.node for i in n.input} | {o.name for g in every for o in g.output}
    used |= {i.name for g in every for i in g.input}
    for g in every:
        keep = [t for t in g.initializer if t.name in used or (candidates is not None and t.name not in candidates)]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)


def drop_unused_function(model: onnx.ModelProto, domain: str, name: str) -> None:
    """Remove the model-local function ``domain::name`` once no node of any graph calls it."""
    if any(n.domain == domain and n.op_type == name for g in graphs(model.graph) for n in g.node):
        return
    keep = [f for f in model.functions if (f.domain, f.name) != (domain, name)]
    del model.functions[:]
    model.functions.extend(keep)


def copied(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model``: a pass returns a new model and leaves the one it was given as it was."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def value_producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Value name -> the node of ``graph`` that computes it (graph inputs and initializers have none)."""
    return {o: n for n in graph.node for o in n.output}


def value_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes of ``graph`` that read it, in graph order (subgraphs not included)."""
    got: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            got.setdefault(i, []).append(n)
    return got
