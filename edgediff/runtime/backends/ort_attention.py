"""Fused attention for ONNX Runtime's CPU sessions: the exported graph's attention, rewritten at session creation.

The bundle's graphs hold attention as torch exports scaled_dot_product_attention at opset 17: per head
Reshape/Transpose, MatMul(Q, Kᵀ), Softmax, MatMul(·, V). Every backend reads that. Run as written it materialises
the scores, tokens² x heads floats: 5.4 GB for SD-Turbo's first self-attention at 1024². ONNX Runtime's CPU kernel
for its own `com.microsoft.MultiHeadAttention` computes the same product in blocks (flash attention): 28 MB
against 357 MB, and 0.6x the time, for a 4096-token, 5-head attention (docs/attention.md; ONNX's own `Attention`
operator of opset 23 runs no faster and no smaller on ONNX Runtime 1.32's CPU). Since that operator is
onnxruntime's alone, the bundle keeps the portable form and the CPU backend rewrites it when a session is created;
the graph cache keeps the result per machine.

The rewrite matches exactly what the exporter writes: Q, K and V projected to (batch, tokens, heads x dim), split
into heads by a Reshape whose shape holds the head count as a constant, the scale either two Muls by
sqrt(1/sqrt(dim)) computed from the shape (the default scale) or constants, and the heads merged back by
Transpose + Reshape. Anything else is left as it is.
"""

from __future__ import annotations

from typing import Any

MHA = "MultiHeadAttention"
DOMAIN = "com.microsoft"
VERSION = "mha1"  # part of the graph cache's key: a changed rewrite never meets a graph cached by the old one


class _Graph:
    def __init__(self, graph: Any):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {t.name: t for t in graph.initializer}

    def op(self, name: str, op_type: str) -> Any:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str) -> Any:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs or users[0].op_type != op_type:
            return None
        return users[0]

    def constant(self, name: str) -> Any:
        """The value of an initializer or Constant node's output, else None."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.op(name, "Constant")
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None


def _perm(node: Any) -> list[int]:
    return [list(a.ints) for a in node.attribute if a.name == "perm"][0] if node is not None else []


def _heads(g: _Graph, transposed: str, perm: list[int]) -> tuple[str, int, list[Any]] | None:
    """(projected input, head count, nodes) for Transpose(Reshape(x, [b, n, heads, dim]), perm)."""
    t = g.op(transposed, "Transpose")
    if t is None or _perm(t) != perm:
        return None
    r = g.op(t.input[0], "Reshape")
    if r is None:
        return None
    shape = g.op(r.input[1], "Concat")
    value = g.constant(shape.input[2]) if shape is not None and len(shape.input) == 4 else g.constant(r.input[1])
    if value is None or value.size != 1 and value.shape != (4,):
        return None
    heads = int(value.reshape(-1)[0] if value.size == 1 else value[2])
    return (r.input[0], heads, [r, t]) if heads > 0 else None


def _scaled(g: _Graph, name: str) -> tuple[str, float | None, list[Any]] | None:
    """(scaled tensor, scale factor or None for the default sqrt(1/sqrt(dim)), nodes) for Mul(x, scale)."""
    mul = g.op(name, "Mul")
    if mul is None:
        return None
    value = g.constant(mul.input[1])
    if value is not None and value.size == 1:
        return mul.input[0], float(value.reshape(-1)[0]), [mul]
    root = g.op(mul.input[1], "Sqrt")
    chain = g.producer.get(root.input[0]) if root is not None else None
    while chain is not None and chain.op_type == "Cast":
        chain = g.producer.get(chain.input[0])
    if chain is None or chain.op_type != "Div" or g.op(chain.input[1], "Sqrt") is None:
        return None
    one = g.constant(chain.input[0])
    return (mul.input[0], None, [mul]) if one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1 else None


def _match(g: _Graph, softmax: Any) -> tuple[Any, list[Any]] | None:
    """The MultiHeadAttention node that replaces the attention around `softmax`, and the nodes it replaces."""
    import onnx

    scores = g.op(softmax.input[0], "MatMul")
    if scores is None or [a.i for a in softmax.attribute if a.name == "axis"] not in ([-1], [3]):
        return None
    q_side, k_side = _scaled(g, scores.input[0]), _scaled(g, scores.input[1])
    if q_side is None or k_side is None:
        return None
    q, k = _heads(g, q_side[0], [0, 2, 1, 3]), _heads(g, k_side[0], [0, 2, 3, 1])
    mixed = g.only_consumer(softmax.output[0], "MatMul")
    if q is None or k is None or mixed is None or mixed.input[0] != softmax.output[0] or q[1] != k[1]:
        return None
    v = _heads(g, mixed.input[1], [0, 2, 1, 3])
    merge = g.only_consumer(mixed.output[0], "Transpose")
    out = g.only_consumer(merge.output[0], "Reshape") if merge is not None and _perm(merge) == [0, 2, 1, 3] else None
    if v is None or out is None or v[1] != q[1]:
        return None
    replaced = [*q[2], *k[2], q_side[2][0], k_side[2][0], scores, softmax, mixed, *v[2], merge, out]
    inside = {o for n in replaced for o in n.output}
    # the default scale reads the heads' shape (a Shape node, dead once fused); any other reader is not ours
    readers = {id(c) for n in replaced[:-1] for o in n.output for c in g.consumers.get(o, []) if c.op_type != "Shape"}
    if readers - {id(n) for n in replaced} or inside & (g.outputs - {out.output[0]}):
        return None
    if (q_side[1] is None) != (k_side[1] is None):
        return None  # one side default, the other constant: not a form the exporter writes
    node = onnx.helper.make_node(MHA, [q[0], k[0], v[0]], [out.output[0]], name=f"{softmax.name}/fused",
                                 domain=DOMAIN, num_heads=q[1])
    if q_side[1] is not None and k_side[1] is not None:
        node.attribute.append(onnx.helper.make_attribute("scale", q_side[1] * k_side[1]))
    return node, replaced


def fuse_attention(model: Any) -> int:
    """Rewrite `model` (an onnx.ModelProto, weights not needed) in place; returns how many attentions it fused."""
    import onnx

    g = _Graph(model.graph)
    fused: dict[int, Any] = {}  # id of the Softmax's MatMul-producing first node -> the new node
    removed: set[int] = set()
    for node in list(model.graph.node):
        if node.op_type != "Softmax":
            continue
        found = _match(g, node)
        if found is None or any(id(n) in removed for n in found[1]):
            continue
        new, replaced = found
        removed.update(id(n) for n in replaced)
        fused[id(replaced[-1])] = new  # placed where the merged output was made: every input exists by then
    if not fused:
        return 0
    nodes = _live([fused.get(id(n), n) for n in model.graph.node if id(n) not in removed or id(n) in fused],
                  {o.name for o in model.graph.output})
    known = {i.name for i in model.graph.input} | set(g.initializers) | {""} | {o for n in nodes for o in n.output}
    if any(i not in known for n in nodes for i in n.input):
        return 0  # a removed tensor is still read (by a Shape we thought dead): leave the graph as it was
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return len(fused)


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """`nodes` less those nothing reads any more (the shape arithmetic of the heads that were fused)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]
