"""Parameters and FLOPs per Flexi-UNet path, counted from the path's Functional graph.

Convention: **FLOPs = 2 x multiply-accumulates** of one forward pass for **one sample**
(batch 1), counting the MACs of convolutions, dense layers (matmuls) and the two
attention products ``q k^T`` and ``attn v``; element-wise work (normalization, SiLU,
softmax, bias adds, residual adds, concatenation, resizing) is not counted. This is the
convention of ``torch.utils.flop_counter.FlopCounterMode`` (which the tests check
against on the torch backend) and of most papers' "FLOPs" / "GFLOPs" columns
(``thop``/``fvcore`` report MACs, i.e. half of this).

Counting walks the path's graph from its outputs back to its inputs, node by node,
and applies the formula of each node's layer to the node's actual input/output
shapes, so a layer shared by several paths is counted once per call in *this* path
only, at *this* path's resolution.
"""

import math

import keras

from ssd_keras.nn import layers as L


def _prod(shape):
    return int(math.prod(int(d) for d in shape))


def conv2d_flops(layer, input_shape, output_shape):
    """2 x MACs of a convolution (``nn.layers.Conv`` or ``keras.layers.Conv2D``):
    out positions x out channels x (kh kw C_in / groups)."""
    k = layer.kernel_size
    kh, kw = (k, k) if isinstance(k, int) else k
    c_in = int(input_shape[-1])
    return 2 * _prod(output_shape[1:]) * kh * kw * c_in // getattr(layer, "groups", 1)


def dense_flops(layer, input_shape):
    """2 x MACs of a Dense on (..., C_in): positions x C_in x units."""
    return 2 * _prod(input_shape[1:-1]) * int(input_shape[-1]) * layer.units


def _spatial(shape):
    return int(shape[1]) * int(shape[2])


def layer_flops(layer, input_shapes, output_shapes):
    """FLOPs (2 x MACs, per sample) of one call of ``layer``.

    ``input_shapes``/``output_shapes``: the shapes of the call's tensor arguments and
    outputs (batch dimension first, ignored). Unknown layer types count 0 (only layers
    doing element-wise work should be unknown; the tests check totals against torch).
    """
    x, out = input_shapes[0], output_shapes[0]
    if isinstance(layer, (L.Conv, keras.layers.Conv2D)):
        return conv2d_flops(layer, x, out)
    if isinstance(layer, (L.Linear, keras.layers.Dense)):
        return dense_flops(layer, x)
    if isinstance(layer, L.TimestepEmbedding):
        e = layer.embed_dim
        return 2 * layer.model_channels * e + 2 * e * e
    if isinstance(layer, L.ResBlock):
        hw, c_in, c = _spatial(x), int(x[-1]), layer.out_channels
        emb_dim = int(input_shapes[1][-1])
        f = 2 * hw * 9 * c_in * c  # in_layers conv
        f += 2 * emb_dim * layer.emb_linear.units  # emb_layers
        f += 2 * hw * 9 * c * c  # out_layers conv
        if layer.skip_connection is not None:
            f += 2 * hw * c_in * c
        return f
    if isinstance(layer, L.AttentionBlock):
        t, c = _spatial(x), int(x[-1])
        return 2 * t * c * 3 * c + 2 * 2 * t * t * c + 2 * t * c * c
    if isinstance(layer, (L.Downsample, L.Upsample)):
        return 2 * _spatial(out) * 9 * int(x[-1]) * layer.channels
    if isinstance(layer, L.OutputHead):
        return 2 * _spatial(out) * 9 * int(x[-1]) * layer.out_channels
    return 0


def graph_nodes(model):
    """Nodes of a Functional ``model`` (each once), walking back from its outputs.

    Keras has no public graph walk for a model whose layers are shared with other models
    (each layer then has several nodes), so this reads ``KerasTensor._keras_history`` and
    ``Operation._inbound_nodes``; ``pyproject.toml`` bounds Keras to the versions
    ``tests/test_flops.py`` passed on.
    """
    input_ids = {id(t) for t in model.inputs}
    seen, nodes = set(), []
    stack = list(model.outputs)
    while stack:
        tensor = stack.pop()
        if id(tensor) in input_ids:
            continue
        op, node_index, _ = tensor._keras_history
        node = op._inbound_nodes[node_index]
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.arguments.keras_tensors)
    return nodes


def graph_flops(model):
    """FLOPs (2 x MACs, one sample) of a Functional model built from Keras layers."""
    total = 0
    for node in graph_nodes(model):
        if isinstance(node.operation, keras.Model):
            raise NotImplementedError("nested models are not supported by graph_flops")
        ins = [tuple(t.shape) for t in node.arguments.keras_tensors]
        outs = [tuple(t.shape) for t in node.outputs]
        total += layer_flops(node.operation, ins, outs)
    return total


def path_cost(model, r_in, r_out):
    """``{"params": int, "flops": int}`` of the Flexi-UNet path ``(r_in, r_out)``.

    ``params``: number of scalars in the variables the path's graph uses (shared
    variables counted once). ``flops``: 2 x multiply-accumulates of one forward pass of
    one sample (see the module docstring).
    """
    path = model.path(r_in, r_out)
    return {
        "params": int(sum(_prod(v.shape) for v in path.variables)),
        "flops": int(graph_flops(path)),
    }


def cost_table(model):
    """One row per path (``model.path_keys`` order) with params, FLOPs and their ratios
    to the full-resolution path ``(image_size, image_size)``."""
    full = path_cost(model, model.image_size, model.image_size)
    rows = []
    for key in model.path_keys:
        c = path_cost(model, *key)
        rows.append(
            {
                "path": key,
                "params": c["params"],
                "flops": c["flops"],
                "params_ratio": c["params"] / full["params"],
                "flops_ratio": c["flops"] / full["flops"],
            }
        )
    return rows


def format_cost_table(rows):
    """A plain-text table of ``cost_table`` rows."""
    lines = [f"{'path':>12} {'params':>12} {'GFLOPs':>10} {'params/full':>12} {'FLOPs/full':>11}"]
    for row in rows:
        lines.append(
            f"{str(row['path']):>12} {row['params']:>12,} {row['flops'] / 1e9:>10.4f} "
            f"{row['params_ratio']:>12.3f} {row['flops_ratio']:>11.3f}"
        )
    return "\n".join(lines)


def run_flops(model, path_counts):
    """Total FLOPs per sample of a run calling each path ``path_counts[(r_in, r_out)]``
    times (e.g. a sampling run: one call per kept step); compare with
    ``n_steps * path_cost(model, r_max, r_max)["flops"]`` for DDPM."""
    return int(sum(n * path_cost(model, *key)["flops"] for key, n in path_counts.items()))
