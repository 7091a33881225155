"""ONNX for serving, built from the Keras model's weights with ``onnx.helper``.

Keras' own ``model.export(format="onnx")`` (tf2onnx) turns Masking + GRU into a ``Loop`` of small
ops: ~17x the cost of ONNX Runtime's native ``GRU`` op per event, growing with the padding (issue
#11). Here the GRU is the native op, fed ``sequence_lens`` (each event's count of particles): an
event's result never depends on its padding, and rows past a batch's longest event are cut before
the GRU, so they cost only their counting. Inside a batch, ONNX Runtime still steps every event
until the longest one ends (finished events are frozen, not skipped): a batch costs about
N x its longest event, so batches of similar lengths (sorted or bucketed) cost the sum of theirs.

The graph is found by walking the functional model back from its output, by layer type, so any model
:mod:`topoflow.models` builds converts; anything else is refused with :class:`UnsupportedModelError`
rather than converted wrongly. Inputs keep the Keras names and shapes (``hlf`` [N, 14], ``particles``
[N, L, 19] padded at the end with zero rows, N and L dynamic); the output is ``probabilities``.
"""

from __future__ import annotations

import numpy as np

from topoflow.errors import TopoflowError

OPSET = 17  # GRU since 14 (layout), Squeeze/ReduceSum with axes as inputs since 13
OUTPUT = "probabilities"


class UnsupportedModelError(TopoflowError):
    """The model holds a layer or option this converter does not translate."""


def to_onnx(model, path=None):
    """The ``onnx.ModelProto`` computing ``model``'s inference outputs (Dropout is the identity);
    also written to ``path`` when given. Raises :class:`UnsupportedModelError` on a layer, activation
    or GRU option it does not translate.

    An event without particles gets the GRU state 0, as in Keras. A batch of *no* events must not be
    run: ONNX Runtime (1.32) aborts the process in its GRU kernel on a batch of size 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(model.outputs) != 1:
        raise UnsupportedModelError(f"{model.name}: one output expected, not {len(model.outputs)}")
    nodes, weights, inputs, names = [], [], [], {}

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def const(name, array, dtype="float32"):
        weights.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def tensor(t):
        """The ONNX name of Keras tensor ``t``, converting the layer that computes it first."""
        if id(t) not in names:
            layer, index, _ = t._keras_history
            names[id(t)] = convert(layer, layer._inbound_nodes[index])
        return names[id(t)]

    def unsupported(layer, what):
        raise UnsupportedModelError(f"cannot convert layer {layer.name!r} ({type(layer).__name__}) to ONNX: {what}")

    def convert(layer, keras_node):
        kind, name, cfg, args = type(layer).__name__, layer.name, layer.get_config(), keras_node.input_tensors
        if len(layer._inbound_nodes) > 1:
            unsupported(layer, "a layer called more than once")
        if kind == "InputLayer":
            if layer.output.dtype != "float32":
                unsupported(layer, f"input dtype {layer.output.dtype}")
            dims = ["N", *(d if d is not None else "L" if i == 1 else f"{name}_{i}"
                           for i, d in enumerate(layer.output.shape[1:], 1))]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
            return name
        if kind in ("Dropout", "Masking"):  # Masking(0.0) leaves values as they are; GRU reads its mask
            if kind == "Masking" and cfg["mask_value"] != 0:
                unsupported(layer, f"mask_value {cfg['mask_value']} (only 0.0)")
            return tensor(args[0])
        if kind == "Concatenate":
            return node("Concat", [tensor(a) for a in args], name, axis=cfg["axis"])
        if kind == "Dense":
            if cfg["activation"] not in ("linear", "relu", "softmax") or len(args[0].shape) != 2:
                unsupported(layer, f"activation {cfg['activation']!r} on a rank-{len(args[0].shape)} input "
                            "(supported: linear, relu or softmax on rank 2)")
            ins = [tensor(args[0]), const(f"{name}/kernel", layer.kernel.numpy())]
            ins += [const(f"{name}/bias", layer.bias.numpy())] if cfg["use_bias"] else []
            if cfg["activation"] == "linear":
                return node("Gemm", ins, name)
            return node(cfg["activation"].capitalize(), [node("Gemm", ins, f"{name}/gemm")], name, **(
                {"axis": -1} if cfg["activation"] == "softmax" else {}))
        if kind == "GRU":
            return gru(layer, cfg, args)
        unsupported(layer, "no ONNX translation for this layer type")

    def gru(layer, cfg, args):
        """Native GRU. Keras and ONNX share the gate order [z, r, h] and h' = z*h + (1-z)*candidate;
        Keras' reset_after=True (its default) is ONNX's linear_before_reset=1. The GRU's mask must
        be Masking's, so that ``sequence_lens`` = the count of steps not all zero (= the length, for
        end-padded events; a zero row inside an event would be skipped by Keras but end it here)."""
        name, units = layer.name, cfg["units"]
        wanted = {"activation": "tanh", "recurrent_activation": "sigmoid", "return_sequences": False,
                  "return_state": False, "go_backwards": False, "stateful": False}
        if bad := {k: cfg[k] for k, v in wanted.items() if cfg[k] != v}:
            unsupported(layer, f"GRU options {bad} (supported: {wanted})")
        x, mask = args[0], args[1] if len(args) > 1 else None
        if mask is not None and type(x._keras_history[0]).__name__ != "Masking":
            unsupported(layer, "a GRU mask that is not the one of a Masking layer right before it")
        seq = tensor(x)
        lens = ""
        if mask is not None:  # steps with any non-zero feature, counted per event: [N] int32
            step_l1 = node("ReduceL1", [seq], f"{name}/step_l1", axes=[2], keepdims=0)
            real = node("Cast", [node("Greater", [step_l1, const(f"{name}/zero", 0.0)], f"{name}/real")],
                        f"{name}/real_i32", to=TensorProto.INT32)
            lens = node("ReduceSum", [real, const(f"{name}/axis1", [1], "int64")], f"{name}/lens", keepdims=0)
            # the GRU sizes (and zero-fills) its buffers by the steps it is given: cut the rows past
            # the longest event, so that padding costs only the counting above
            longest = node("Cast", [node("ReduceMax", [lens], f"{name}/longest_i32", keepdims=1)],
                           f"{name}/longest", to=TensorProto.INT64)
            seq = node("Slice", [seq, const(f"{name}/start", [0], "int64"), longest, f"{name}/axis1"], f"{name}/cut")
        kernel, recurrent = layer.cell.kernel.numpy(), layer.cell.recurrent_kernel.numpy()
        bias = np.zeros(6 * units, "float32")  # ONNX [Wb, Rb]: Keras' [input, recurrent] rows, or Wb only
        if cfg["use_bias"]:
            bias[:3 * units * (1 + cfg["reset_after"])] = layer.cell.bias.numpy().reshape(-1)
        ins = [node("Transpose", [seq], f"{name}/time_major", perm=[1, 0, 2]),  # ORT: layout=0 only
               const(f"{name}/W", kernel.T[None]), const(f"{name}/R", recurrent.T[None]),
               const(f"{name}/B", bias[None]), lens]
        nodes.append(helper.make_node("GRU", ins, ["", f"{name}/Y_h"], name=name, hidden_size=units,
                                      linear_before_reset=int(cfg["reset_after"]), activations=["Sigmoid", "Tanh"]))
        # Y_h: the state after each event's last real step, Keras' masked output; 0 for 0 steps, as in Keras
        return node("Squeeze", [f"{name}/Y_h", const(f"{name}/axis0", [0], "int64")], f"{name}/state")

    out = tensor(model.outputs[0])
    if out != OUTPUT:
        node("Identity", [out], OUTPUT)
    output = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", model.outputs[0].shape[-1]])
    graph = helper.make_graph(nodes, model.name, inputs, [output], weights)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="topoflow")
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save(proto, str(path))
    return proto
