"""TF Serving's REST predict format: JSON request -> numpy inputs, numpy outputs -> JSON answer.

Row format: `{"signature_name": S, "instances": [row, ...]}`, each row an
object of inputs (or a bare value when the signature has one input), answered
by `{"predictions": [...]}` (per-row objects, or bare values when the
signature has one output). Columnar format: `{"inputs": {name: [values]}}`
(or a bare list for one input), answered by `{"outputs": ...}`. Strings may be
given as `{"b64": "..."}`, as in TF Serving. Every problem raises BadRequest
with a message naming the field, row and expected type.

Beyond TF Serving: the `generate` signature's `max_new_tokens` and `seed` may
be left out (serving.json's default_max_new_tokens, and -1: greedy), and
`max_new_tokens` must lie in 0..max_new_tokens_limit.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any

import numpy as np

from serving.model import DTYPES, Signature, Tensor

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


class BadRequest(Exception):
    """A request the server refuses; `status` is the HTTP code (400 unless said)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Request:
    """A parsed predict request: the signature, its inputs as arrays, and the row count."""

    signature: Signature
    inputs: dict[str, np.ndarray]
    rows: int
    columnar: bool


def _scalar(value: Any, tensor: Tensor, where: str) -> Any:
    kind = DTYPES[tensor.dtype][0]
    if kind == "string":
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"{where}: 'b64' is not valid base64") from None
        raise BadRequest(f"{where}: expected a string, got {_describe(value)}")
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"{where}: expected an integer, got {_describe(value)}")
        low, high = INT_RANGES[tensor.dtype]
        if not low <= value <= high:
            raise BadRequest(f"{where}: {value} is out of the {tensor.dtype} range")
        return value
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadRequest(f"{where}: expected a number, got {_describe(value)}")
        return value
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: expected true or false, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _value(value: Any, tensor: Tensor, depth: int, where: str) -> Any:
    """A row's value (scalar, or nested lists for inner dimensions), checked element by element."""
    if depth == 0:
        return _scalar(value, tensor, where)
    if not isinstance(value, list):
        raise BadRequest(
            f"{where}: expected a list ({depth} more dimensions), got {_describe(value)}"
        )
    return [_value(v, tensor, depth - 1, f"{where}[{i}]") for i, v in enumerate(value)]


def _column(values: list[Any], name: str, tensor: Tensor, columnar: bool) -> np.ndarray:
    """One input's values for all rows as an array; `columnar` only shapes the messages."""
    inner = len(tensor.shape) - 1
    rows = [
        _value(v, tensor, inner, f"inputs.{name}[{i}]" if columnar else f"instances[{i}].{name}")
        for i, v in enumerate(values)
    ]
    dtype = DTYPES[tensor.dtype][1]
    if inner == 0:
        array = np.empty(len(rows), dtype=object) if dtype is object else np.array(rows, dtype)
        if dtype is object:
            array[:] = rows
        return array
    try:
        array = np.array(rows, dtype=dtype)
    except ValueError:
        raise BadRequest(f"input '{name}': rows of different shapes") from None
    for axis, size in enumerate(tensor.shape[1:], start=1):
        if array.ndim != len(tensor.shape) or (size is not None and array.shape[axis] != size):
            raise BadRequest(
                f"input '{name}': shape {list(array.shape)} does not fit {list(tensor.shape)}"
            )
    return array


def _defaults(signature: Signature, meta: dict[str, Any]) -> dict[str, Any]:
    """Inputs a request may leave out, with the value they take."""
    candidates = {"max_new_tokens": meta.get("default_max_new_tokens"), "seed": -1}
    return {k: v for k, v in candidates.items() if k in signature.inputs and v is not None}


def parse(body: Any, signatures: dict[str, Signature], meta: dict[str, Any]) -> Request:
    """Check a predict request's JSON and turn it into arrays with a leading batch dimension."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request must be a JSON object, got {_describe(body)}")
    name = body.get("signature_name", "serving_default")
    if not isinstance(name, str):
        raise BadRequest(f"'signature_name' must be a string, got {_describe(name)}")
    if name not in signatures:
        raise BadRequest(
            f"unknown signature_name {name!r}; this model has: {', '.join(signatures)}"
        )
    signature = signatures[name]
    unknown = set(body) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}; expected 'instances' or 'inputs'")
    if ("instances" in body) == ("inputs" in body):
        raise BadRequest(
            "the request needs exactly one of 'instances' (rows) or 'inputs' (columns)"
        )
    defaults = _defaults(signature, meta)
    if "instances" in body:
        columns, rows = _rows_to_columns(body["instances"], signature, defaults)
    else:
        columns, rows = _columns(body["inputs"], signature, defaults)
    columnar = "inputs" in body
    inputs = {k: _column(v, k, signature.inputs[k], columnar) for k, v in columns.items()}
    _check_limits(inputs, meta)
    return Request(signature, inputs, rows, columnar)


def _rows_to_columns(
    instances: Any, signature: Signature, defaults: dict[str, Any]
) -> tuple[dict[str, list], int]:
    if not isinstance(instances, list):
        raise BadRequest(f"'instances' must be a list, got {_describe(instances)}")
    if not instances:
        raise BadRequest("'instances' is empty: send at least one row")
    names = list(signature.inputs)
    columns: dict[str, list] = {k: [] for k in names}
    for i, row in enumerate(instances):
        if not isinstance(row, dict) or (len(names) == 1 and set(row) == {"b64"}):
            if len(names) != 1:
                raise BadRequest(
                    f"instances[{i}]: expected an object with inputs {', '.join(names)}, "
                    f"got {_describe(row)}"
                )
            row = {names[0]: row}
        _check_keys(row, signature, defaults, f"instances[{i}]")
        for k in names:
            columns[k].append(row.get(k, defaults.get(k)))
    return columns, len(instances)


def _columns(
    inputs: Any, signature: Signature, defaults: dict[str, Any]
) -> tuple[dict[str, list], int]:
    names = list(signature.inputs)
    if not isinstance(inputs, dict):
        if len(names) != 1:
            raise BadRequest(
                f"'inputs' must be an object with {', '.join(names)}, got {_describe(inputs)}"
            )
        inputs = {names[0]: inputs}
    _check_keys(inputs, signature, defaults, "inputs")
    given = {k: v for k, v in inputs.items()}
    for k, v in given.items():
        if not isinstance(v, list):
            raise BadRequest(f"inputs.{k} must be a list (one value per row), got {_describe(v)}")
    lengths = {k: len(v) for k, v in given.items()}
    rows = max(lengths.values())
    if rows == 0:
        raise BadRequest("'inputs' is empty: send at least one row")
    if len(set(lengths.values())) > 1:
        raise BadRequest(f"inputs have different numbers of rows: {lengths}")
    columns = {k: given.get(k, [defaults.get(k)] * rows) for k in names}
    return columns, rows


def _check_keys(row: dict, signature: Signature, defaults: dict[str, Any], where: str) -> None:
    names = list(signature.inputs)
    for key in row:
        if key not in signature.inputs:
            raise BadRequest(
                f"{where}: unknown input {key!r}; signature {signature.name!r} takes "
                f"{', '.join(names)}"
            )
    for key in names:
        if key not in row and key not in defaults:
            raise BadRequest(f"{where}: missing input {key!r} (signature {signature.name!r})")


def _check_limits(inputs: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    if "max_new_tokens" not in inputs:
        return
    limit = meta.get("max_new_tokens_limit")
    values = inputs["max_new_tokens"]
    if (values < 0).any():
        raise BadRequest(f"max_new_tokens must be >= 0, got {int(values.min())}")
    if limit is not None and (values > limit).any():
        raise BadRequest(
            f"max_new_tokens {int(values.max())} is over this model's limit of {limit}"
        )


def _to_json(array: np.ndarray) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        return _decode(array.tolist())
    return array.tolist()


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def answer(outputs: dict[str, np.ndarray], columnar: bool) -> dict[str, Any]:
    """TF Serving's answer: {"predictions": rows} or {"outputs": columns}."""
    names = sorted(outputs)
    if columnar:
        columns = {k: _to_json(outputs[k]) for k in names}
        return {"outputs": columns[names[0]] if len(names) == 1 else columns}
    columns = {k: _to_json(outputs[k]) for k in names}
    rows = len(columns[names[0]])
    if len(names) == 1:
        return {"predictions": columns[names[0]]}
    return {"predictions": [{k: columns[k][i] for k in names} for i in range(rows)]}
