"""AUTOMATIC1111's prompt language, parsed as A1111 parses it (``modules/prompt_parser.py``, its wiki's
"Attention/emphasis" and "Prompt editing" sections).

- ``parse_attention(text)``: emphasis and ``BREAK`` -> [(text, weight)], a ``BREAK`` as (``"BREAK"``, -1).
  ``(a)`` x1.1, ``((a))`` x1.21, ``[a]`` /1.1, ``(a:1.3)``, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]``
  ``\\\\`` are literal. A1111's leniency is kept: an unclosed ``(`` or ``[`` applies to the end of the prompt, an
  unmatched ``)`` or ``]`` is text, ``(a:b)`` with a non-numeric weight is the text ``a:b`` at x1.1, and runs
  of equal weight are merged.
- ``prompt_schedule(text, steps)``: prompt editing ``[from:to:when]`` (``when`` a step number, or a fraction of
  the steps when it has a decimal point; ``[to:when]`` adds, ``[from::when]`` removes) and alternation
  ``[a|b]`` (one more each step) -> [(last step, text)], as ``get_learned_conditioning_prompt_schedules``
  (without hires fix). A prompt the grammar does not take is one segment, unchanged, as A1111 does.
- ``lora_tags(text)``: A1111's ``<lora:NAME:WEIGHT>`` (and ``<lora:NAME:TE:UNET>``) tags taken out of the text.

Pure Python (the schedule grammar on ``lark``, as A1111 itself); the encoding side is
``runtime/weighted_prompts.py``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .errors import InputError

BREAK = ("BREAK", -1.0)
SYNTAXES = ("plain", "a1111", "compel")  # compel's: runtime/compel_syntax.py

_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_LORA = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*){0,3})>")
ROUND, SQUARE = 1.1, 1 / 1.1


def check_syntax(syntax: Any) -> str:
    """A prompt syntax sdrt reads, else InputError naming the choices."""
    if syntax not in SYNTAXES:
        raise InputError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}",
                         cli=f"--prompt-syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    return str(syntax)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as A1111's ``parse_prompt_attention``: fragments with their weights, ``BREAK`` as ("BREAK", -1)."""
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, k: float) -> None:
        for item in res[start:]:
            item[1] *= k

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _number(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for pos in round_open:
        multiply(pos, ROUND)
    for pos in square_open:
        multiply(pos, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # runs of equal weight become one fragment
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def _number(s: str) -> float:
    """A weight as A1111 reads it (Python's float; "1.2.3" and "." are not numbers: A1111 raises there too, so
    sdrt refuses them, naming the weight)."""
    try:
        return float(s)
    except ValueError:
        raise InputError(f"the attention weight {s!r} is not a number (write (text:1.2))") from None


_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@lru_cache(maxsize=1)
def _parser() -> Any:
    try:
        import lark
    except ImportError as e:  # pragma: no cover - a core dependency
        raise InputError("A1111's prompt editing needs the lark package: pip install lark") from e
    return lark.Lark(_GRAMMAR)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, prompt)] over steps 1..``steps`` (each prompt holds from the step after the previous
    segment's last through its own), as A1111's ``get_learned_conditioning_prompt_schedules`` without hires fix.
    A prompt without editing or alternation is [(steps, text)]."""
    import lark

    try:
        tree = _parser().parse(text)
    except lark.exceptions.LarkError:
        return [(steps, text)]
    ends = _collect_steps(steps, tree)
    return [(t, _at_step(t, tree)) for t in ends]


def segments(texts: Sequence[str], steps: int) -> list[tuple[int, list[str]]]:
    """Several prompts' schedules on one timeline: [(last step, each prompt's text until then)], the steps where
    any of them changes (a call encodes each segment once for all its prompts)."""
    scheds = [prompt_schedule(t, steps) for t in texts]
    ends = sorted({e for sched in scheds for e, _ in sched})
    return [(e, [next(text for end, text in sched if e <= end) for sched in scheds]) for e in ends]


def segment_starts(ends: Sequence[int]) -> list[int]:
    """The loop step (0-based) where each segment starts: A1111's step i reads the first segment whose last step is
    at least i, so segment j starts after the previous one's last step (the first at 0)."""
    return [0, *(e + 1 for e in ends[:-1])]


def _collect_steps(steps: int, tree: Any) -> list[int]:
    import lark

    res = [steps]

    class Collect(lark.Visitor):
        def scheduled(self, t: Any) -> None:
            s = t.children[-2]
            v = float(s)
            v = v * steps if "." in s else v
            t.children[-2] = min(steps, int(v))
            if t.children[-2] >= 1:
                res.append(t.children[-2])

        def alternate(self, t: Any) -> None:
            res.extend(range(1, steps + 1))

    Collect().visit(tree)
    return sorted(set(res))


def _at_step(step: int, tree: Any) -> str:
    import lark

    class AtStep(lark.Transformer):
        def scheduled(self, args: list[Any]) -> Any:
            before, after, _, when, _ = args
            yield before or () if step <= when else after

        def alternate(self, args: list[Any]) -> Any:
            args = ["" if not a else a for a in args]
            yield args[(step - 1) % len(args)]

        def start(self, args: list[Any]) -> str:
            def flatten(x: Any) -> Any:
                if isinstance(x, str):
                    yield x
                else:
                    for g in x:
                        yield from flatten(g)

            return "".join(flatten(args))

        def plain(self, args: list[Any]) -> Any:
            yield args[0].value

        def __default__(self, data: Any, children: list[Any], meta: Any) -> Any:
            yield from children

    return str(AtStep().transform(tree))


def lora_tags(text: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's ``<lora:NAME>``, ``<lora:NAME:MULTIPLIER>`` and ``<lora:NAME:TE:UNET>`` tags taken out of a prompt,
    as A1111 does: (the prompt without them, (name, scale) pairs). With two numbers the UNet's (the second) is
    the scale (sdrt's slots are the UNet's); one number is both; none is 1. A multiplier that is no number is an
    InputError naming the tag."""
    found: list[tuple[str, float]] = []

    def take(m: re.Match[str]) -> str:
        nums = [v for v in m.group(2).split(":")[1:] if v.strip() != ""]
        try:
            scale = float(nums[1]) if len(nums) > 1 else float(nums[0]) if nums else 1.0
        except ValueError:
            raise InputError(f"{m.group(0)}: the multiplier must be a number, e.g. <lora:{m.group(1)}:0.8>") from None
        found.append((m.group(1).strip(), scale))
        return ""

    return _LORA.sub(take, text).strip(), found
