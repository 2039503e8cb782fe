"""Bad and odd arguments for fastbn's public functions and its layer, and the rule every call must obey.

A :class:`Variant` replaces one argument of a valid call and says what must happen:

* ``"ok"``: the call succeeds, and its result is the oracle's for the values actually passed
  (what ``np.asarray`` of the argument holds);
* ``"error"``: a TypeError or ValueError whose message starts with the name of one of
  ``Variant.names`` (``"name: ..."``, or ``"saved.field: ..."`` for ``saved``), with every
  array the caller passed bit-for-bit unchanged;
* ``"either"``: one of the two.

:func:`outcome` runs a call and holds it to that, and to the rules that hold for every call:
no other exception, no NumPy RuntimeWarning.  The catalogues below (:func:`input_variants`,
:func:`vector_variants`, :func:`running_variants`, :data:`OPTION_VARIANTS`) are the argument
classes: Python types, dtypes, shapes and ranks, empty dimensions, strides, read-only memory,
aliasing and option values.  Values (NaN, Inf, huge, subnormal) are drawn by the tests.
"""

from __future__ import annotations

import fractions
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

try:  # torch is an optional test dependency: without it, its variants are left out
    import torch
except ImportError:  # pragma: no cover - the CI installs torch
    torch = None

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
OK, ERROR, EITHER = "ok", "error", "either"


@dataclass
class Variant:
    """One argument's replacement and what it must lead to (see the module docstring).

    ``rule``, if given, decides ``(expect, names)`` from the whole call's final arguments,
    for values whose validity depends on the others (a list is float64: fine beside float64
    parameters only; eps = 0 is fine in eval only; ...).
    """

    label: str
    value: Any
    expect: str = ERROR
    names: tuple = ()
    rule: Callable[[dict], tuple] | None = None


@dataclass
class Mutation:
    """A change to a call's arguments (``apply``: dict -> dict), labelled by the argument it is about."""

    arg: str
    label: str
    apply: Callable[[dict], dict]
    expect: str = ERROR
    names: tuple = ()
    rule: Callable[[dict], tuple] | None = None

    def expectation(self, args: dict) -> tuple[str, tuple]:
        """``(expect, names)`` for the final arguments ``args``; the argument itself may always be named."""
        expect, names = (self.expect, self.names) if self.rule is None else self.rule(args)
        return expect, (self.arg, *tuple(names))

    @property
    def benign(self) -> bool:
        """Whether it keeps the values, dtype and shape and must always be accepted (a second mutation)."""
        return self.rule is None and self.expect == OK and self.label in BENIGN_LABELS

    def __repr__(self):
        return f"{self.arg}={self.label}"


BENIGN_LABELS = ("readonly", "negative_stride", "noncontiguous", "fortran", "rotated_memory", "torch")


def replace(arg: str, variant: Variant, also=()) -> Mutation:
    """The mutation setting ``arg`` to the variant's value; ``also``: (other arg, transform) applied with it."""

    def apply(args):
        new = dict(args)
        new[arg] = variant.value
        for other, transform in also:
            new[other] = transform(new.get(other))
        return new

    return Mutation(arg, variant.label, apply, variant.expect, variant.names, variant.rule)


def combine(resolved: list[tuple[str, tuple]]) -> tuple[str, tuple]:
    """The expectation of a call with several mutations: an error if any must raise, success if all
    must succeed; an error may name any argument of a mutation that is not plainly fine."""
    expects = [e for e, _ in resolved]
    names = tuple(n for e, ns in resolved if e != OK for n in ns)
    if ERROR in expects:
        return ERROR, names
    if EITHER in expects:
        return EITHER, names
    return OK, names


class Sweep:
    """Runs checks and collects every failure, so that one does not hide the others."""

    def __init__(self):
        self.failures, self.count = [], 0

    def run(self, label, check, *args):
        """``check(*args)``, a failed assertion recorded under ``label``."""
        self.count += 1
        try:
            check(*args)
        except AssertionError as exc:  # Violation included
            self.failures.append(f"{label}: {exc}")

    def done(self, at_least: int):
        assert not self.failures, f"{len(self.failures)} of {self.count} calls broke the rules:\n" + "\n".join(
            self.failures
        )
        assert self.count >= at_least, f"only {self.count} calls ran"


# ------------------------------------------------------------------ host views ---
def is_torch(value) -> bool:
    return torch is not None and isinstance(value, torch.Tensor)


def host(value):
    """The NumPy array fastbn sees for ``value`` (a view for NumPy and torch, np.asarray otherwise)."""
    if value is None:
        return None
    if is_torch(value):
        return value.detach().numpy()
    if isinstance(value, np.ndarray):
        return value.view(np.ndarray)
    return np.asarray(value)


def fingerprint(value):
    """A NaN-safe, bit-exact record of an array's contents (None for what is not an array)."""
    if value is None or not (isinstance(value, np.ndarray) or is_torch(value)):
        return None
    a = host(value)
    bases = []
    base = a.base
    while isinstance(base, np.ndarray):  # the memory around a view must not change either
        bases.append(np.ascontiguousarray(base).tobytes())
        base = base.base
    return a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes(), tuple(bases)


# --------------------------------------------------------------- the checker ---
class Violation(AssertionError):
    """A call broke the rule of its variant."""


def _names_ok(message: str, names) -> bool:
    return any(message.startswith(f"{n}:") or message.startswith(f"{n}.") for n in names)


def outcome(call, *, expect: str, names, guarded: dict, what: str = ""):
    """Run ``call()``; return ``(True, result)`` on success, ``(False, error)`` after an allowed error.

    Raises :class:`Violation` for anything else: an exception other than TypeError/ValueError, an
    error where success was required (or the reverse), an error naming none of ``names``, a
    NumPy RuntimeWarning, or (after an error) any array of ``guarded`` changed.
    """
    before = {name: fingerprint(value) for name, value in guarded.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = call(), None
        except (TypeError, ValueError) as exc:
            result, error = None, exc
        except Exception as exc:  # any other exception is the failure being tested for
            raise Violation(f"{what}: raised {type(exc).__name__}: {exc}") from exc
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if runtime:
        raise Violation(f"{what}: NumPy RuntimeWarning(s) {runtime}")
    if error is not None:
        if expect == OK:
            raise Violation(f"{what}: must succeed, raised {type(error).__name__}: {error}")
        if not _names_ok(str(error), names):
            raise Violation(f"{what}: {type(error).__name__} {str(error)!r} does not start with any of {names}")
        for name, value in guarded.items():
            if fingerprint(value) != before[name]:
                raise Violation(f"{what}: {name} changed although the call failed ({error})")
        return False, error
    if expect == ERROR:
        raise Violation(f"{what}: must be refused, naming one of {names}, but the call succeeded")
    return True, result


# ------------------------------------------------------- value-keeping layouts ---
class ArrayLike:
    """An object NumPy converts through ``__array__``, by copying."""

    def __init__(self, values):
        self.values = np.array(values)

    def __array__(self, dtype=None, copy=None):
        return self.values.copy() if dtype is None else self.values.astype(dtype)


def readonly(a):
    b = np.array(a)
    b.flags.writeable = False
    return b


def negative_stride(a):
    """The same values, with a negative stride along axis 0."""
    return np.flip(np.flip(a, 0).copy(), 0)


def noncontiguous(a):
    """The same values, every other element of a NaN-filled buffer along axis 0."""
    big = np.full((2 * a.shape[0], *a.shape[1:]), np.nan).astype(a.dtype)
    big[::2] = a
    return big[::2]


def fortran(a):
    return np.asfortranarray(a)


def rotated_memory(a):
    """The same values, stored with the axes in a rotated order (neither C nor Fortran)."""
    perm = (*tuple(range(1, a.ndim)), 0)
    return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))


def zero_stride(a):
    """A writable array whose axis 0 has stride 0: every row is ``a[0]``."""
    first = np.array(a[:1])
    return np.lib.stride_tricks.as_strided(first, a.shape, (0, *first.strides[1:]))


def masked(a):
    return np.ma.masked_array(a, mask=np.zeros(np.shape(a), bool))


def matrix(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(a)


def to_torch(a):
    return torch.from_numpy(np.array(a))


def structured(a):
    out = np.zeros(a.shape, dtype=[("v", "f4")])
    out["v"] = a
    return out


def nested(a, kind):
    """``a`` as a nested list or tuple of Python floats."""
    lst = np.asarray(a).astype(np.float64).tolist()
    if kind is list:
        return lst

    def tup(v):
        return tuple(tup(u) for u in v) if isinstance(v, list) else v

    return tup(lst)


def other_float(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) != np.float64 else np.dtype(np.float32)


# A layout of an array fastbn only reads: all must be accepted, with the values they hold.
READ_LAYOUTS = {
    "readonly": readonly,
    "negative_stride": negative_stride,
    "noncontiguous": noncontiguous,
}
ND_LAYOUTS = {"fortran": fortran, "rotated_memory": rotated_memory}

# Not arrays at all.
NOT_ARRAYS = {
    "str": "abc",
    "bytes": b"abc",
    "dict": {"a": 1},
    "set": {1.0, 2.0},
    "int": 3,
    "float": 1.5,
    "complex": 1j,
    "object": object(),
    "ellipsis": Ellipsis,
}
BAD_DTYPES = ("int32", "int64", "uint8", "bool", "complex64", "complex128", "object", "datetime64[s]")


def _retyped(a, dtype):
    if dtype == "object":
        return np.asarray(a).astype(object)
    if dtype.startswith("datetime64"):
        return np.zeros(np.shape(a), dtype)
    return np.asarray(a).astype(dtype)


def float32_beside(args) -> bool:
    """Whether any array argument of the call (a Saved's mean included) is float32."""
    for name, value in args.items():
        if name == "saved":
            value = getattr(value, "mean", None)
        if isinstance(value, np.ndarray) or is_torch(value):
            try:
                if host(value).dtype == np.float32:
                    return True
            except (TypeError, RuntimeError):
                continue
    return False


def _float64_only(names=()):
    """Rule for a list/tuple (float64 after np.asarray) as the input: fine where nothing beside it is
    float32, else an error that names the list (not the float32 arrays, which are right)."""

    def rule(args):
        return (ERROR, names) if float32_beside(args) else (OK, ())

    return rule


def _expecting(expect, names=()):
    """Variant keywords for ``expect``: an expectation (OK, ERROR, EITHER), or a rule deciding it from the call."""
    return dict(rule=expect) if callable(expect) else dict(expect=expect, names=names)


def input_variants(a, *, required=True, names=(), same_dtype_as=None, empty_batch=ERROR):
    """Variants of an x-shaped array that fastbn only reads (x, dy, y, residual, layer_weight).

    ``same_dtype_as``: the dtype the argument must have (residual, dy and y must match x), None for x
    itself; ``names``: other arguments an error may name (a mismatch can be blamed on either side);
    ``empty_batch``: what ``a[:0]`` must give, an expectation or a rule (an empty batch is valid input
    of forward, moments and normalize, but where axis 0 is the channel axis it has no channels).
    """
    out = [Variant(label, make(a), OK) for label, make in READ_LAYOUTS.items()]
    out += [Variant(label, make(a), OK) for label, make in ND_LAYOUTS.items()]
    out.append(Variant("zero_stride", zero_stride(a), OK))
    out.append(Variant("array_like", ArrayLike(a), OK))
    if a.dtype != BFLOAT16:  # NumPy reads a buffer's format; bfloat16 has none
        out.append(Variant("memoryview", memoryview(np.ascontiguousarray(a)), OK))
    if torch is not None and a.dtype != BFLOAT16:
        out.append(Variant("torch", to_torch(a), OK))
    if a.ndim == 2:
        out.append(Variant("matrix", matrix(a), OK))
    for kind in (list, tuple):
        if same_dtype_as is None:
            out.append(Variant(kind.__name__, nested(a, kind), rule=_float64_only(names)))
        else:
            out.append(Variant(kind.__name__, nested(a, kind), OK if same_dtype_as == np.float64 else ERROR, names))
    out.append(Variant("masked", masked(a), ERROR))
    out.append(Variant("none", None, ERROR if required else OK, names))
    out += [Variant(label, value, ERROR, names) for label, value in NOT_ARRAYS.items()]
    out.append(Variant("0d", np.asarray(a).reshape(-1)[:1].reshape(()), ERROR, names))
    out.append(Variant("1d", np.asarray(a).reshape(-1), ERROR, names))
    out.append(Variant("structured", structured(a), ERROR, names))
    out += [Variant(dt, _retyped(a, dt), ERROR, names) for dt in BAD_DTYPES]
    out.append(Variant("other_float", a.astype(other_float(a.dtype)), ERROR, names))
    out.append(Variant("empty_batch", np.asarray(a)[:0], **_expecting(empty_batch, names)))
    out.append(Variant("ragged_list", [[1.0, 2.0], [3.0]], ERROR, names))
    if same_dtype_as is not None:
        out.append(
            Variant("wrong_shape", np.asarray(a)[:-1] if a.shape[0] > 1 else np.concatenate([a, a]), ERROR, names)
        )
        out.append(Variant("float16", a.astype(np.float16), ERROR if a.dtype != np.float16 else OK, names))
    return out


def vector_variants(v, *, required=False, names=(), sdtype=None, rule=None):
    """Variants of a per-channel vector that fastbn only reads (weight, bias, mean, var, fold's arguments).

    The fixed expectations are those of a strict parameter: exactly ``(C,)`` in ``sdtype`` (forward's,
    backward's and fold's).  ``rule``: a parameter that takes more (normalize's: any floating dtype, any
    shape broadcasting along the channel axis); every variant the strict rule refuses, a ragged list
    besides, is then decided by ``rule`` from the whole call (``None`` for an optional one stays fine).
    """
    sdtype = np.dtype(sdtype or v.dtype)
    c = v.shape[0]
    out = [Variant(label, make(v), OK) for label, make in READ_LAYOUTS.items()]
    out.append(Variant("zero_stride", zero_stride(v), OK))
    out.append(Variant("array_like", ArrayLike(v), OK))
    if torch is not None:
        out.append(Variant("torch", to_torch(v), OK))
    for kind in (list, tuple):
        out.append(Variant(kind.__name__, nested(v, kind), OK if sdtype == np.float64 else ERROR, names))
    out.append(Variant("masked", masked(v), ERROR))
    out.append(Variant("matrix", matrix(v), ERROR))
    out.append(Variant("none", None, ERROR if required else OK, names))
    out += [Variant(label, value, ERROR, names) for label, value in NOT_ARRAYS.items()]
    out += [Variant(dt, _retyped(v, dt), ERROR, names) for dt in BAD_DTYPES]
    out.append(Variant("structured", structured(v), ERROR, names))
    out.append(Variant("other_float", v.astype(other_float(sdtype)), ERROR, names))
    out.append(Variant("float16", v.astype(np.float16), ERROR, names))
    out.append(Variant("bfloat16", v.astype(BFLOAT16), ERROR, names))
    out.append(Variant("long", np.concatenate([v, v[:1]]), ERROR, names))
    out.append(Variant("short", v[:-1], ERROR, names))
    out.append(Variant("empty", v[:0], ERROR, names))
    out.append(Variant("row", v.reshape(1, c), ERROR, names))
    out.append(Variant("column", v.reshape(c, 1), ERROR, names))
    out.append(Variant("0d", v[0], ERROR, names))
    out.append(Variant("python_float", 1.0, ERROR, names))
    if rule is not None:
        out.append(Variant("ragged_list", [[1.0, 2.0], [3.0]], ERROR, names))
        for variant in out:
            if variant.expect == ERROR and variant.label != "none":
                variant.rule = rule
    return out


def updates_running(args):
    """Whether a forward with these arguments updates its running statistics (training, the default)."""
    training = args.get("training", True)
    return not (isinstance(training, (bool, np.bool_)) and not training)


def write_only_refusal(args):
    """The expectation of a running statistic that is fine to read but not to write: refused where
    forward updates it (training), taken where it only reads it (eval)."""
    return (ERROR, ()) if updates_running(args) else (OK, ())


def read_only_conversion(ok_in_eval):
    """The rule of a running statistic that eval may convert (it only reads it) but training may not: refused
    in training (the update would be lost), and in eval ``OK`` if ``ok_in_eval`` (else refused by name: a
    float64 list beside float32 statistics)."""

    def rule(args):
        return (ERROR, ()) if updates_running(args) or not ok_in_eval else (OK, ())

    return rule


def running_variants(rm, rv, which):
    """Variants of one running statistic of forward, which fastbn updates in place in training.

    Only the caller's own writable memory is acceptable there: anything NumPy would convert into a
    copy, read-only memory, a zero stride, or memory shared with the other statistic is refused.  In
    eval, where they are only read, read-only memory, a zero stride, an expanded tensor and anything
    converted as an input (a list of the right dtype, an ``__array__`` object) are taken.
    """
    value = rm if which == "running_mean" else rv
    other = "running_var" if which == "running_mean" else "running_mean"
    out = [Variant("negative_stride", negative_stride(value), OK), Variant("noncontiguous", noncontiguous(value), OK)]
    if torch is not None:
        out.append(Variant("torch", to_torch(value), OK))
        expanded = to_torch(value[:1]).expand(value.shape[0])
        one = value.shape[0] == 1  # an expansion over one channel has stride 0 and overwrites nothing
        out.append(Variant("torch_expanded", expanded, OK, rule=None if one else write_only_refusal))
        out.append(Variant("torch_requires_grad", to_torch(value).requires_grad_(True), ERROR))
    out.append(Variant("readonly", readonly(value), rule=write_only_refusal))
    one = value.shape[0] == 1  # a zero stride over one channel overwrites nothing
    out.append(Variant("zero_stride", zero_stride(value), OK, rule=None if one else write_only_refusal))
    float64 = value.dtype == np.float64  # a list converts to float64
    for label, make in (("list", list), ("tuple", tuple), ("array_like", ArrayLike)):
        converted = make(value.tolist()) if label != "array_like" else ArrayLike(value)
        out.append(Variant(label, converted, ERROR, rule=read_only_conversion(float64 or label == "array_like")))
    out.append(Variant("memoryview", memoryview(np.array(value)), EITHER))  # writable memory: taken or refused
    out.append(Variant("masked", masked(value), ERROR))
    out.append(Variant("matrix", matrix(value), ERROR))
    out.append(Variant("none", None, ERROR, (other,)))
    out += [Variant(label, v, ERROR) for label, v in NOT_ARRAYS.items()]
    out += [Variant(dt, _retyped(value, dt), ERROR) for dt in BAD_DTYPES]
    out.append(Variant("other_float", value.astype(other_float(value.dtype)), ERROR))
    out.append(Variant("float16", value.astype(np.float16), ERROR))
    out.append(Variant("long", np.concatenate([value, value[:1]]), ERROR))
    out.append(Variant("short", value[:-1].copy(), ERROR))
    out.append(Variant("row", value.reshape(1, -1).copy(), ERROR))
    out.append(Variant("0d", np.array(value[0]), ERROR))
    return out


# -------------------------------------------------------------- scalar options ---
OPTION_VARIANTS = {
    "training": [
        Variant("np_true", np.bool_(True), OK),
        Variant("np_false", np.bool_(False), OK),
        Variant("int1", 1),
        Variant("int0", 0),
        Variant("none", None),
        Variant("str", "True"),
        Variant("float", 1.0),
        Variant("list", [True]),
        Variant("0d_array", np.array(True)),
    ],
    "momentum": [
        Variant("zero", 0.0, OK),
        Variant("one", 1.0, OK),
        Variant("int1", 1, OK),
        Variant("np_float32", np.float32(0.25), OK),
        Variant("fraction", fractions.Fraction(1, 3), OK),
        Variant("negative", -0.1),
        Variant("above_one", 1.5),
        Variant("nan", math.nan),
        Variant("inf", math.inf),
        Variant("-inf", -math.inf),
        Variant("str", "0.1"),
        Variant("none", None),
        Variant("bool", True),
        Variant("complex", 0.1j),
        Variant("list", [0.1]),
        Variant("huge_int", 10**400),
        Variant("0d_array", np.array(0.1)),
    ],
    "eps": [
        Variant("1e-3", 1e-3, OK),
        Variant("one", 1.0, OK),
        Variant("big", 100.0, OK),
        Variant("int", 1, OK),
        Variant("np_float32", np.float32(1e-3), OK),
        Variant("fraction", fractions.Fraction(1, 1000), OK),
        Variant("negative", -1e-5),
        Variant("nan", math.nan),
        Variant("inf", math.inf),
        Variant("str", "1e-5"),
        Variant("none", None),
        Variant("bool", True),
        Variant("huge_int", 10**400),
        Variant("0d_array", np.array(1e-5)),
        Variant("complex", 1e-5j),
    ],
    "activation": [
        Variant("np_str", np.str_("relu"), OK),
        Variant("upper", "RELU"),
        Variant("empty", ""),
        Variant("gelu", "gelu"),
        Variant("bytes", b"relu"),
        Variant("int", 1),
        Variant("bool", True),
        Variant("list", ["relu"]),
    ],
    "backend": [
        Variant("cpu", "cpu", OK),
        Variant("gpu", "gpu"),
        Variant("upper", "CPU"),
        Variant("int", 1),
        Variant("list", ["cpu"]),
        Variant("cuda", "cuda", ERROR, ("x", "dy", "layer_weight")),
    ],
}


def axis_variants(axis, ndim, none=ERROR):
    """The channel axis: the same axis the other way round is fine, anything else is refused.

    ``none``: what ``axis=None`` must give, an expectation or a rule (moments and normalize take it
    for their default channel axis 1; forward, backward and fold refuse it).
    """
    other = axis - ndim if axis >= 0 else axis + ndim
    return [
        Variant("other_sign", other, OK),
        Variant("np_int", np.int64(axis), OK),
        Variant("0d_array", np.array(axis), EITHER),
        Variant("too_big", ndim),
        Variant("too_negative", -ndim - 1),
        Variant("float", float(axis)),
        Variant("str", str(axis)),
        Variant("none", None, **_expecting(none)),
        Variant("bool", True),
        Variant("huge", 10**400),
        Variant("list", [axis]),
    ]


@dataclass
class Collective:
    """A process group of one process: synchronised batch norm must equal the plain one."""

    calls: list = field(default_factory=list)

    def allgather(self, vector):
        self.calls.append("allgather")
        return np.asarray(vector, np.float64)[None]

    def allreduce_sum(self, vector):
        self.calls.append("allreduce_sum")
        return np.array(vector, np.float64)
