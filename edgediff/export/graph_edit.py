"""Small in-place edits of an ONNX graph that more than one export step makes."""

from __future__ import annotations

import onnx


def drop_unread(graph: onnx.GraphProto, op_type: str) -> None:
    """Remove the `op_type` nodes whose outputs nothing reads, until none is left (removing one can leave its own
    input unread); graph outputs count as read."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for n in graph.node for name in n.input} | outputs
        unread = [n for n in graph.node if n.op_type == op_type and not set(n.output) & read]
        if not unread:
            return
        for n in unread:
            graph.node.remove(n)
