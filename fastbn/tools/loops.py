"""Instructions per element of a kernel's innermost loops: from its PTX, and from its SASS where nvdisasm is installed.

``python -m fastbn ptx`` (:mod:`fastbn.tools.ptx`) prints this figure for every
kernel beside ptxas's registers and spills, so that a change to the kernels'
arithmetic shows in the instruction count before any GPU runs them.

How the figure is made:

1. The kernel's code is split into basic blocks: a block starts at a label
   or after a branch, and ends at a branch or before a label.
2. Loops are the natural loops of the control-flow graph: an edge from a
   block to one that dominates it (a backward branch, ``bra`` to an earlier
   label) closes a loop whose body is its header and every block that
   reaches the branch without passing the header.  Only blocks reachable
   from the entry count (ptxas ends every function with an unreachable
   ``BRA`` to itself).
3. A loop is *innermost* when no other loop's header lies inside it.  Its
   instruction count is static: every instruction of every block of the
   body, labels, directives (``.pragma``, ``.loc``, ...) and comments
   excluded, rarely taken paths inside the body included.
4. Elements per iteration are the global loads, per iteration, from the
   kernel's first array argument, which is the per-element input of every
   reduction and elementwise kernel (``x`` or ``dy``, ``gather``'s source).
   A load belongs to it when its address derives, through any chain of
   integer instructions, from that argument's data pointer, which Numba
   passes as PTX parameter 4 (an array argument is its meminfo, parent,
   size, itemsize, data pointer, then shape and strides) and the kernel
   converts with ``cvta.to.global``.  A vector load (``ld.global.v2``,
   ``.v4``) counts as 2 or 4 elements.  Counting loads rather than the
   arrays' types keeps float32's input apart from its float32 per-channel
   coefficients.  A loop with no such load is not a data loop: a block
   reduction over shared memory, or a per-channel kernel's work; the
   per-channel kernels whose first array is a partials buffer
   (``stats_merge``) report their loop over the splits, one partial an
   element.
5. The hot loop is the data loop with the most elements per iteration.
   NVVM unrolls some loops of unknown trip count (by 4 or 2) and leaves a
   loop of 1 element for the remainder; the unrolled body is what runs when
   the trip count is large, as in the reductions (16 elements a thread).
   Every innermost data loop is listed beside it, as instructions/elements,
   because a short trip count runs only the remainder loop: a grid-stride
   elementwise kernel whose threads take fewer than 4 steps each.

The SASS count takes the same loops from ``nvdisasm``'s listing of the cubin
that ptxas made.  SASS has no parameter names to trace, so a SASS loop's
elements come from the PTX loop with as many global loads (``LDG``) per
iteration, or a whole multiple of them (ptxas unrolled it further); a SASS
loop that matches none is listed with its loads and no per-element figure.
Calls (64-bit division, the slow path of IEEE reciprocal and division) are
counted as the one ``CALL`` instruction, not the subroutine's body.
Everything here works without a disassembler: the SASS figure then says
what to install.  nvdisasm costs about half a second a kernel, mostly its
start-up, which is why callers can skip it (``summarize(..., sass=False)``,
``python -m fastbn ptx --no-sass``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

#: Numba passes an array argument as meminfo, parent, nitems, itemsize, data, shape..., strides...:
#: the PTX parameter of the first argument's data pointer.
FIRST_ARRAY_DATA_PARAM = 4

#: The wheel that carries ``nvdisasm`` (CUDA 13's: it reads cubins for cc 7.5 and up; for cc 7.0, CUDA 12's
#: nvdisasm must be on PATH, which no wheel carries).
DISASSEMBLER_WHEEL = "nvidia-cuda-nvdisasm"

#: What the SASS figure says when no disassembler is found.
NO_DISASSEMBLER = f"no disassembler (install {DISASSEMBLER_WHEEL})"

#: What it says when the caller asked for none.
SASS_SKIPPED = "not counted (--no-sass)"


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One instruction, as much of it as the loop analysis needs.

    Attributes
    ----------
    opcode : str
        Such as ``ld.global.f32`` or ``LDG.E``.
    text : str
        The whole statement, predicate included.
    target : str or None
        The label a branch jumps to.
    conditional : bool
        Guarded by a predicate (a conditional branch falls through).
    ends_block : bool
        A branch, return or exit: the next instruction starts a block.
    falls_through : bool
        Control can reach the next instruction.
    """

    opcode: str
    text: str
    target: str | None = None
    conditional: bool = False
    ends_block: bool = False
    falls_through: bool = True


@dataclasses.dataclass(frozen=True)
class LoopCount:
    """One innermost loop: its size and what it loads per iteration.

    Attributes
    ----------
    header : str
        The label of the loop's first block.
    instructions : int
        Static count of the body's instructions.
    global_loads : int
        Global load instructions in the body (from any array).
    elements : int or None
        Elements of the first array argument loaded per iteration (vector
        loads count their width); None where that cannot be told (a SASS loop
        that matches no PTX loop).
    """

    header: str
    instructions: int
    global_loads: int
    elements: int | None

    @property
    def per_element(self) -> float | None:
        """Instructions per element, or None for a loop with no (known) elements."""
        return self.instructions / self.elements if self.elements else None


#: A function's code, item by item: a label (``str``) or an :class:`Instruction`.
Item: TypeAlias = str | Instruction
#: A basic block: its label (None after a branch) and its instructions.
_Block: TypeAlias = tuple[str | None, list[Instruction]]
#: One half of :func:`summarize`'s result: ``{"loops": [[instructions, global loads, elements], ...]}`` or
#: ``{"error": reason}``.
Part: TypeAlias = dict[str, Any]


# --------------------------------------------------------------- the CFG ---
def _blocks(items: Iterable[Item]) -> list[_Block]:
    """Split ``items`` (label strings and :class:`Instruction`) into ``(label, instructions)`` blocks."""
    blocks: list[_Block] = []
    label: str | None
    body: list[Instruction]
    label, body = None, []
    for item in items:
        if isinstance(item, str):
            if body or label is not None:
                blocks.append((label, body))
            label, body = item, []
            continue
        body.append(item)
        if item.ends_block:
            blocks.append((label, body))
            label, body = None, []
    if body or label is not None:
        blocks.append((label, body))
    return blocks


def innermost_loops(items: Iterable[Item]) -> list[tuple[str, list[Instruction]]]:
    """The innermost natural loops of a function's code.

    Parameters
    ----------
    items : list
        The function's code in order: a label is a ``str``, anything else an
        :class:`Instruction`.

    Returns
    -------
    list of (str, list of Instruction)
        Each innermost loop's header label and the instructions of its body,
        in code order, loops in the order of their headers.
    """
    blocks = _blocks(items)
    index = {label: i for i, (label, _) in enumerate(blocks) if label is not None}
    successors: list[list[int]] = []
    for i, (_, code) in enumerate(blocks):
        last = code[-1] if code else None
        following = [i + 1] if i + 1 < len(blocks) and (last is None or last.falls_through) else []
        jumps = [index[last.target]] if last is not None and last.target in index else []
        successors.append(sorted(set(following + jumps)))
    reachable: set[int]
    stack: list[int]
    reachable, stack = {0} if blocks else set(), [0] if blocks else []
    while stack:
        for succ in successors[stack.pop()]:
            if succ not in reachable:
                reachable.add(succ)
                stack.append(succ)
    predecessors: dict[int, list[int]] = {i: [] for i in reachable}
    for i in reachable:
        for succ in successors[i]:
            predecessors[succ].append(i)
    dominators = _dominators(sorted(reachable), predecessors)
    loops: dict[int, set[int]] = {}
    for source in reachable:
        for header in successors[source]:
            if header in dominators[source]:  # a back edge closes a natural loop
                body = loops.setdefault(header, {header})
                stack = [source]
                while stack:
                    block = stack.pop()
                    if block not in body:
                        body.add(block)
                        stack.extend(predecessors[block])
    innermost = [h for h, body in loops.items() if not any(other != h and other in body for other in loops)]
    return [
        (blocks[h][0] or f"block {h}", [ins for b in sorted(loops[h]) for ins in blocks[b][1]])
        for h in sorted(innermost)
    ]


def _dominators(order: Sequence[int], predecessors: Mapping[int, Sequence[int]]) -> dict[int, set[int]]:
    """Each reachable block's set of dominators (the iterative data-flow solution; ``order[0]`` is the entry)."""
    everything = set(order)
    dominators = {block: set(everything) for block in order}
    dominators[order[0]] = {order[0]}
    changed = True
    while changed:
        changed = False
        for block in order[1:]:
            preds = [dominators[p] for p in predecessors[block]]
            new = set.intersection(*preds) | {block} if preds else {block}
            if new != dominators[block]:
                dominators[block], changed = new, True
    return dominators


# ------------------------------------------------------------------- PTX ---
_PTX_LABEL = re.compile(r"^\s*([$%\w.]+):")
_PTX_STATEMENT = re.compile(r"^(@!?%?\w+\s+)?([A-Za-z][\w.]*)\s*(.*)$", re.DOTALL)
_REGISTER = re.compile(r"%[A-Za-z_]\w*")
_PARAM = re.compile(r"_param_(\d+)\s*\]")
_VECTOR = re.compile(r"\.v(\d)\b")
#: PTX instructions whose first operand is not a register they write.
_NO_DEST = ("st.", "bra", "ret", "exit", "bar.", "barrier", "red.", "membar", "fence", "trap", "prefetch", "call")


def _ptx_entries(ptx: str) -> dict[str, list[tuple[bool, str]]]:
    """``{entry name: [(is label, text), ...]}``: the labels and statements of every ``.entry``, comments removed."""
    text = re.sub(r"/\*.*?\*/", "", ptx, flags=re.DOTALL)
    entries: dict[str, list[tuple[bool, str]]] = {}
    name: str | None = None
    depth = 0
    body: list[tuple[bool, str]] | None = None
    for raw in text.splitlines():
        line = raw.split("//", 1)[0].strip()
        found = re.match(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)", line)
        if found:
            name, depth, body = found.group(1), 0, None
            continue
        if name is None:
            continue
        if line == "{":
            depth += 1
            if depth == 1:
                body = entries.setdefault(name, [])
            continue
        if line == "}":
            depth -= 1
            if depth == 0:
                name = None
            continue
        if body is None or not line:
            continue
        label = _PTX_LABEL.match(line)
        if label:
            body.append((True, label.group(1)))
            line = line[label.end() :].strip()
        body.extend((False, statement.strip()) for statement in line.split(";") if statement.strip())
    return entries


def _ptx_instruction(statement: str) -> Instruction | None:
    """An :class:`Instruction` for a PTX statement, or None for a directive."""
    if statement.startswith(".") or statement in "{}":
        return None
    found = _PTX_STATEMENT.match(statement)
    if not found:
        return None
    predicate, opcode, operands = found.groups()
    conditional = predicate is not None
    if opcode.split(".")[0] == "bra":
        return Instruction(opcode, statement, operands.strip(), conditional, True, conditional)
    if opcode.split(".")[0] in ("ret", "exit", "trap"):
        return Instruction(opcode, statement, None, conditional, True, conditional)
    return Instruction(opcode, statement)


def _operands(statement: str) -> str:
    """The operand text of a PTX statement (after the opcode)."""
    found = _PTX_STATEMENT.match(statement)
    return found.group(3) if found else ""


def _destinations(instruction: Instruction) -> list[str]:
    """The registers a PTX instruction writes (its first operand, ``{...}`` and ``a|b`` pairs included)."""
    if instruction.opcode.startswith(_NO_DEST):
        return []
    operands = _operands(instruction.text)
    first = operands.split("}", 1)[0] if operands.startswith("{") else operands.split(",", 1)[0]
    return _REGISTER.findall(first)


def _pointer_params(register: str, definitions: Mapping[str, Sequence[Instruction]], seen: set[str]) -> set[int]:
    """PTX parameters whose ``cvta.to.global`` pointer feeds ``register``, following every definition back."""
    if register in seen:
        return set()
    seen.add(register)
    params: set[int] = set()
    for instruction in definitions.get(register, ()):
        sources = [r for r in _REGISTER.findall(_operands(instruction.text)) if r not in _destinations(instruction)]
        if instruction.opcode.startswith("cvta.to.global"):
            params |= _param_sources(sources, definitions, set())
            continue
        for source in sources:
            params |= _pointer_params(source, definitions, seen)
    return params


def _param_sources(
    registers: Iterable[str], definitions: Mapping[str, Sequence[Instruction]], seen: set[str]
) -> set[int]:
    """The parameters that ``registers`` were loaded from by ``ld.param`` (through moves)."""
    params: set[int] = set()
    for register in registers:
        if register in seen:
            continue
        seen.add(register)
        for instruction in definitions.get(register, ()):
            if instruction.opcode.startswith("ld.param"):
                params.update(int(p) for p in _PARAM.findall(instruction.text))
            elif instruction.opcode.startswith(("mov", "cvta")):
                sources = [r for r in _REGISTER.findall(_operands(instruction.text)) if r != register]
                params |= _param_sources(sources, definitions, seen)
    return params


def _load_width(opcode: str) -> int:
    """Elements a global load reads: its vector width, 1 for a scalar load."""
    found = _VECTOR.search(opcode)
    return int(found.group(1)) if found else 1


def ptx_loops(ptx: str, element_param: int = FIRST_ARRAY_DATA_PARAM) -> list[LoopCount]:
    """Every innermost loop of the first ``.entry`` of ``ptx``, counted.

    Parameters
    ----------
    ptx : str
        PTX text, as NVVM wrote it.
    element_param : int, default FIRST_ARRAY_DATA_PARAM
        The PTX parameter (``..._param_N``) holding the data pointer of the
        array whose loads are the elements.

    Returns
    -------
    list of LoopCount
        In the order of the loops' headers; empty when the kernel has no loop
        (or ``ptx`` no entry).
    """
    entries = _ptx_entries(ptx)
    if not entries:
        return []
    items: list[Item] = []
    for is_label, text in next(iter(entries.values())):
        item = text if is_label else _ptx_instruction(text)
        if item is not None:
            items.append(item)
    definitions: dict[str, list[Instruction]] = {}
    for item in items:
        if isinstance(item, Instruction):
            for register in _destinations(item):
                definitions.setdefault(register, []).append(item)
    results: list[LoopCount] = []
    for header, body in innermost_loops(items):
        loads = [ins for ins in body if ins.opcode.startswith("ld.global")]
        elements = 0
        for load in loads:
            address = re.search(r"\[([^\]]*)\]", load.text)
            registers = _REGISTER.findall(address.group(1)) if address else []
            params = set().union(*(_pointer_params(r, definitions, set()) for r in registers)) if registers else set()
            if element_param in params:
                elements += _load_width(load.opcode)
        results.append(LoopCount(header, len(body), len(loads), elements))
    return results


# ------------------------------------------------------------------ SASS ---
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_SASS_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_SASS_TARGET = re.compile(r"`\(([^)]+)\)")


def _sass_instruction(text: str) -> Instruction:
    """An :class:`Instruction` for one SASS instruction (``@P0 BRA `(.L_x_3)``, ``EXIT``, ...)."""
    parts = text.split()
    predicate = parts[0] if parts and parts[0].startswith("@") else None
    words = parts[1:] if predicate else parts
    opcode = words[0] if words else ""
    conditional = predicate is not None and predicate not in ("@PT",)
    base = opcode.split(".")[0]
    if base == "BRA":
        target = _SASS_TARGET.search(text)
        # `BRA P1, target` branches on P1 as well as on the guard
        conditional = conditional or (len(words) > 1 and re.fullmatch(r"!?U?P\d,", words[1]) is not None)
        return Instruction(opcode, text, target.group(1) if target else None, conditional, True, conditional)
    if base in ("EXIT", "RET", "BRX", "JMX", "KILL"):
        return Instruction(opcode, text, None, conditional, True, conditional)
    return Instruction(opcode, text)


def sass_functions(listing: str) -> dict[str, list[Item]]:
    """``{function name: code items}`` of an ``nvdisasm`` listing, each function's labels and instructions in order."""
    functions: dict[str, list[Item]] = {}
    items: list[Item] | None = None
    for line in listing.splitlines():
        section = _SASS_SECTION.match(line)
        if section:
            items = functions.setdefault(section.group(1), [])
            continue
        if items is None:
            continue
        instruction = _SASS_LINE.match(line)
        if instruction:
            items.append(_sass_instruction(instruction.group(2)))
            continue
        label = _SASS_LABEL.match(line)
        # labels: .L_x_N, and subroutine entries; not directives such as `.text.name:`
        if label and (line.lstrip().startswith(".L") or not line.lstrip().startswith(".")):
            items.append(label.group(1))
    return functions


def sass_loops(listing: str, function: str | None = None) -> list[LoopCount]:
    """Every innermost loop of one function of an ``nvdisasm`` listing, counted (elements unknown: None).

    Parameters
    ----------
    listing : str
        ``nvdisasm -c``'s output for a cubin.
    function : str, optional
        The kernel's (mangled) name; by default the first function that is
        not one of ptxas's helpers (``__cuda_*``, ``__internal_*``).

    Returns
    -------
    list of LoopCount
        ``global_loads`` counts ``LDG`` instructions; ``elements`` is None
        (:func:`match_elements` supplies it).
    """
    functions = sass_functions(listing)
    if function not in functions:
        helpers = ("__cuda", "__internal", "$__internal")
        function = next((name for name in functions if not name.startswith(helpers)), None)
    if function is None:
        return []
    results: list[LoopCount] = []
    for header, body in innermost_loops(functions[function]):
        loads = sum(1 for ins in body if ins.opcode.startswith("LDG"))
        results.append(LoopCount(header, len(body), loads, None))
    return results


def match_elements(sass: Iterable[LoopCount], ptx: Sequence[LoopCount]) -> list[LoopCount]:
    """SASS loops with their elements taken from the PTX loop of as many global loads per iteration.

    A SASS loop with exactly the global loads of some PTX loop takes that
    loop's elements (0 for a loop that loads other arrays only), where every
    such PTX loop agrees; otherwise one with k times the loads of a PTX data
    loop takes k times its elements (ptxas unrolled it further).  A loop with
    no global load has 0 elements; any other keeps None.
    """
    data = [loop for loop in ptx if loop.elements]
    matched: list[LoopCount] = []
    for loop in sass:
        elements = 0 if not loop.global_loads else None
        same = {c.elements for c in ptx if c.global_loads == loop.global_loads}
        if loop.global_loads and len(same) == 1:
            elements = same.pop()
        elif loop.global_loads and not same:
            for candidate in sorted(data, key=lambda c: -c.global_loads):
                if loop.global_loads % candidate.global_loads == 0:
                    assert candidate.elements is not None  # data holds the loops with elements only
                    elements = candidate.elements * (loop.global_loads // candidate.global_loads)
                    break
        matched.append(dataclasses.replace(loop, elements=elements))
    return matched


# --------------------------------------------------------- disassembling ---
@functools.cache
def disassemblers() -> tuple[str, ...]:
    """Paths of the ``nvdisasm`` executables found: on PATH, under CUDA_HOME / CUDA_PATH, then in installed wheels."""
    found: list[str] = []
    on_path = shutil.which("nvdisasm")
    if on_path:
        found.append(on_path)
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root and os.path.isfile(os.path.join(root, "bin", "nvdisasm")):
            found.append(os.path.join(root, "bin", "nvdisasm"))
    try:
        files = importlib.metadata.distribution(DISASSEMBLER_WHEEL).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "nvdisasm":
            path = str(file.locate())
            if os.path.isfile(path) and os.access(path, os.X_OK):
                found.append(path)
    return tuple(dict.fromkeys(os.path.realpath(path) for path in found))


def disassemble(cubin: bytes) -> tuple[str | None, str]:
    """``nvdisasm -c``'s listing of ``cubin`` with the first disassembler that reads it.

    Returns
    -------
    (str or None, str)
        The listing, or None and why not (no disassembler, or what the last
        one said).
    """
    tools = disassemblers()
    if not tools:
        return None, NO_DISASSEMBLER
    reason = ""
    with tempfile.TemporaryDirectory(prefix="fastbn-sass-") as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        for tool in tools:
            try:
                proc = subprocess.run([tool, "-c", path], capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                reason = f"nvdisasm: {exc}"
                continue
            if proc.returncode == 0 and proc.stdout.strip():
                return proc.stdout, ""
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            reason = "nvdisasm: " + re.sub(r"^nvdisasm fatal\s*:\s*", "", last).strip()
            if "deprecated" in last:
                reason += " (no wheel carries CUDA 12's nvdisasm: put a CUDA 12 toolkit's on PATH)"
    return None, reason


def disassembler_version() -> str:
    """``"nvdisasm 13.5.37"``: the first disassembler found and its version, or ``"none"``."""
    tools = disassemblers()
    if not tools:
        return "none"
    try:
        text = subprocess.run([tools[0], "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    found = re.search(r"V(\d+(?:\.\d+)+)", text)
    return f"nvdisasm {found.group(1)}" if found else f"nvdisasm ({tools[0]})"


# --------------------------------------------------------------- summary ---
def _entry_name(ptx: str) -> str | None:
    """The name of the first ``.entry`` of ``ptx``, or None."""
    found = re.search(r"\.entry\s+([\w$]+)", ptx)
    return found.group(1) if found else None


def summarize(ptx: str, cubin: bytes | None = None, sass: bool = True) -> dict[str, Part]:
    """The loop figures of one kernel, as plain data (JSON can carry it from the CUDA 12 process).

    Parameters
    ----------
    ptx : str
        The kernel's PTX.
    cubin : bytes, optional
        What ptxas made of it; without it there is no SASS figure.
    sass : bool, default True
        Disassemble ``cubin`` for the SASS figure (about half a second of
        nvdisasm's start-up a kernel); False skips it.

    Returns
    -------
    dict
        ``ptx`` and ``sass``: each ``{"loops": [[instructions, global loads,
        elements], ...]}`` of the innermost loops (elements None where
        unknown), or for SASS ``{"error": reason}``.
    """
    loops = ptx_loops(ptx)
    summary: dict[str, Part] = {"ptx": {"loops": [[lp.instructions, lp.global_loads, lp.elements] for lp in loops]}}
    if not sass:
        summary["sass"] = {"error": SASS_SKIPPED}
        return summary
    if cubin is None:
        summary["sass"] = {"error": "no cubin (nvJitLink not installed)"}
        return summary
    listing, reason = disassemble(cubin)
    if listing is None:
        summary["sass"] = {"error": reason}
        return summary
    matched = match_elements(sass_loops(listing, _entry_name(ptx)), loops)
    summary["sass"] = {"loops": [[lp.instructions, lp.global_loads, lp.elements] for lp in matched]}
    return summary


def data_loops(part: Mapping[str, Any]) -> list[LoopCount]:
    """The data loops of one half of :func:`summarize`'s result, hot loop first; [] for an error or no loop.

    Returns
    -------
    list of LoopCount
        Loops that load elements (or, in SASS, global loads of unknown
        elements), the one with the most elements per iteration first.
    """
    loops = [LoopCount("", *entry) for entry in part.get("loops", ())]
    data = [lp for lp in loops if lp.elements or (lp.elements is None and lp.global_loads)]
    return sorted(data, key=lambda lp: -(lp.elements or 0))


def per_element(part: Mapping[str, Any]) -> float | None:
    """Instructions per element of the hot loop of one half of :func:`summarize`'s result, or None."""
    loops = data_loops(part)
    return loops[0].per_element if loops else None


def describe(part: Mapping[str, Any]) -> str:
    """A compact text of one half of :func:`summarize`'s result.

    ``37.5 instr/elem (150/4, 41/1)``: the hot loop's figure, then every data
    loop as instructions/elements (``91/?`` for loads of unknown elements);
    ``no data loop`` (with the count of other loops) where none loads
    elements; the error for SASS that could not be read.
    """
    if "error" in part:
        error: str = part["error"]
        return error
    loops = data_loops(part)
    others = len(part.get("loops", ())) - len(loops)
    if not loops:
        return f"no data loop ({others} other)" if others else "no loop"
    listed = ", ".join(f"{lp.instructions}/{lp.elements or '?'}" for lp in loops)
    figure = loops[0].per_element
    head = f"{figure:.1f} instr/elem" if figure is not None else "? instr/elem"
    return f"{head} ({listed})"
