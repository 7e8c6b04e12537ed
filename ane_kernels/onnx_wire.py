"""Read and rewrite the few fields of a saved tier graph that loading needs, from the
protobuf bytes, without the ``onnx`` package.

Loading a bundle only needs a graph's metadata, its tier (the x input's row count) and
the same graph with that row count made symbolic: importing ``onnx`` (and protobuf) for
that cost ~8 MB of RSS and ~0.3 s in every process that runs programs. Fields used
(onnx.proto): ModelProto.graph = 7, .metadata_props = 14 (StringStringEntryProto key 1,
value 2); GraphProto.input = 11, .output = 12; ValueInfoProto.name = 1, .type = 2;
TypeProto.tensor_type = 1; TypeProto.Tensor.shape = 2; TensorShapeProto.dim = 1;
Dimension.dim_value = 1, .dim_param = 2. Every other field is copied byte for byte.
"""

from typing import Iterator, List, Tuple

MODEL_GRAPH, MODEL_PROPS = 7, 14
GRAPH_INPUT, GRAPH_OUTPUT = 11, 12
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_SHAPE, SHAPE_DIM = 1, 2, 1
DIM_VALUE, DIM_PARAM = 1, 2

Field = Tuple[int, int, object, bytes]  # (number, wire type, value, the field's raw bytes)


class WireError(ValueError):
    """Not a protobuf message of the shape expected."""


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    v = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def fields(buf: bytes) -> Iterator[Field]:
    """The top-level fields of one message, in order."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise WireError(f"unsupported wire type {wt}")
        if i > len(buf):
            raise WireError("truncated field")
        yield num, wt, val, buf[start:i]


def _msg(num: int, payload: bytes) -> bytes:
    return _enc_varint(num << 3 | 2) + _enc_varint(len(payload)) + payload


def _first(buf: bytes, num: int) -> bytes:
    for n, wt, v, _ in fields(buf):
        if n == num and wt == 2:
            return v
    return b""


def metadata(model: bytes) -> dict:
    """ModelProto.metadata_props as {key: value}."""
    out = {}
    for n, wt, v, _ in fields(model):
        if n == MODEL_PROPS and wt == 2:
            kv = {k: val for k, w, val, _ in fields(v) if w == 2}
            out[kv.get(1, b"").decode()] = kv.get(2, b"").decode()
    return out


def _dims(value_info: bytes) -> List[Tuple[str, object]]:
    shape = _first(_first(_first(value_info, VALUE_TYPE), TYPE_TENSOR), TENSOR_SHAPE)
    dims = []
    for n, wt, d, _ in fields(shape):
        if n == SHAPE_DIM and wt == 2:
            got = ("?", None)
            for k, w, v, _ in fields(d):
                if k == DIM_VALUE and w == 0:
                    got = ("value", v)
                elif k == DIM_PARAM and w == 2:
                    got = ("param", v.decode())
            dims.append(got)
    return dims


def value_dims(model: bytes, name: str) -> List[Tuple[str, object]]:
    """[("value", n) | ("param", name) | ("?", None)] per dim of graph input/output ``name``."""
    graph = _first(model, MODEL_GRAPH)
    for n, wt, v, _ in fields(graph):
        if n in (GRAPH_INPUT, GRAPH_OUTPUT) and wt == 2 and _first(v, VALUE_NAME).decode() == name:
            return _dims(v)
    raise WireError(f"graph has no input or output {name!r}")


def _set_dim(value_info: bytes, axis: int, param: str) -> bytes:
    """value_info with dim ``axis`` of its tensor shape replaced by the symbolic ``param``."""
    def rebuild(buf: bytes, path: Tuple[int, ...]) -> bytes:
        out, seen = bytearray(), 0
        for n, wt, v, raw in fields(buf):
            if path and n == path[0] and wt == 2:
                out += _msg(n, rebuild(v, path[1:]))
            elif not path and n == SHAPE_DIM and wt == 2:
                out += _msg(n, _enc_varint(DIM_PARAM << 3 | 2) + _enc_varint(len(param)) + param.encode()) \
                    if seen == axis else raw
                seen += 1
            else:
                out += raw
        return bytes(out)

    return rebuild(value_info, (VALUE_TYPE, TYPE_TENSOR, TENSOR_SHAPE))


def with_symbolic_dim(model: bytes, names, axis: int, param: str) -> bytes:
    """The model with dim ``axis`` of graph inputs/outputs ``names`` made the symbol ``param``."""
    out = bytearray()
    for n, wt, v, raw in fields(model):
        if n == MODEL_GRAPH and wt == 2:
            g = bytearray()
            for gn, gw, gv, graw in fields(v):
                hit = gn in (GRAPH_INPUT, GRAPH_OUTPUT) and gw == 2 and _first(gv, VALUE_NAME).decode() in names
                g += _msg(gn, _set_dim(gv, axis, param)) if hit else graw
            out += _msg(n, bytes(g))
        else:
            out += raw
    return bytes(out)
