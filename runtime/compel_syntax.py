"""compel's prompt dialect, parsed as compel 2.5.1 parses it (``compel/prompt_parser.py``: a pyparsing grammar,
followed here rule for rule in plain Python, with its ordered choices and its whitespace rules).

- ``word+`` x1.1, ``word++`` x1.21, ``word-`` x0.9 (``1.1 ** n``, ``0.9 ** n``); ``(several words)+``,
  ``"quoted words"-``, ``(words)1.3``, ``word.attend(1.3)``; nesting multiplies.
- ``("a cat", "a dog").blend(0.7, 0.3)``: a weighted mix of the prompts' embeddings (weights normalized to sum 1,
  unless the last option is ``no_normalize``); ``("a cat", "a dog").and()`` (or ``.add()``, optional weights):
  the prompts' embeddings joined on the sequence. Both take the whole prompt.
- ``\\(`` ``\\)`` ``\\"`` are the characters; ``\\,`` ``\\.`` ``\\+`` ``\\-`` ``\\=`` keep a sign inside a word and
  reach the tokenizer with their backslash, as in compel.
- Fragments of equal weight are joined with one space, and a space follows every comma, as compel does.

``parse_compel(text)`` -> ``CompelPrompt``. compel reads what its grammar cannot place as text: an unclosed or
unmatched bracket or quote, a ``.blend()`` that is not the whole prompt. sdrt refuses those (InputError naming the
fix) rather than give a picture of the brackets, as it refuses what compel raises on (a count of blend weights
that does not match its prompts, a weight that is no number, text after a blend) and what compel's Compel does not
apply (``.swap()``, ``withLora()``). ``strict=False`` keeps compel's reading (the tests compare it with compel's
own parser). Pure Python; the encoding side is ``runtime/compel_prompts.py``.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import InputError

PLUS, MINUS = 1.1, 0.9  # compel's attention_plus_base, attention_minus_base
MAX_DEPTH = 24  # brackets nested deeper are refused (the parser recurses per level; no prompt needs more)
SYNTACTIC = '()",.+-='
WHITE = " \n\t\r"  # pyparsing's default whitespace (skipped before each element)
STRING_WS = string.whitespace  # what compel's words may not hold
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")  # pyparsing_common.real
_INT = re.compile(r"-?[0-9]+")
_KEYWORD = re.compile(r"[A-Za-z0-9_-]+")
_QUOTED = re.compile(r'"(?:(?:\\")|(?:[^"\n\r]))*"')
_UNQUOTE = re.compile(r"(\\t|\\n|\\f|\\r)|(\\[0-7]{3}|\\0|\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4})|(.)|(\n|.)")
_WS_ESCAPES = {r"\t": "\t", r"\n": "\n", r"\f": "\f", r"\r": "\r"}
_OPERATORS = (".blend(", ".and(", ".add(")
_FIX_BRACKETS = (r"close it, or write \( \) for the characters themselves (a lone + - or = inside brackets: "
                 r"write \+ \- \=)")

Fragments = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Blend:
    """``(...).blend(w...)``: each prompt's fragments and its weight; ``normalize``: weights divided by their sum."""

    prompts: tuple[Fragments, ...]
    weights: tuple[float, ...]
    normalize: bool = True


@dataclass(frozen=True)
class CompelPrompt:
    """A parsed prompt: its parts (fragments, or a blend) joined on the sequence, each with its weight (``.and()``;
    one part of weight 1 otherwise); ``loras``: compel's ``withLora(name, w)`` (kept only with ``strict=False``)."""

    parts: tuple[Fragments | Blend, ...]
    weights: tuple[float, ...]
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def plain(self) -> bool:
        """One part at weight 1 whose every fragment has weight 1 (nothing to weigh or blend)."""
        return (len(self.parts) == 1 and not isinstance(self.parts[0], Blend) and self.weights == (1.0,)
                and all(w == 1.0 for _, w in self.parts[0]) and not self.loras)


# -- the parse tree (compel's Fragment, Attention, LoraWeight, CrossAttentionControlSubstitute, Blend, Conjunction) --

@dataclass
class _Frag:
    text: str
    raw: str | None = None  # a free word (text compel's grammar did not place), as written


@dataclass
class _Attn:
    weight: float
    children: list[Any]


@dataclass
class _Lora:
    name: str
    weight: float


@dataclass
class _Swap:
    target: list[Any]


@dataclass
class _Prompt:  # a Prompt: where compel fuses fragments of equal weight
    children: list[Any]


@dataclass
class _Blend:
    prompts: list[_Prompt]
    weights: list[float]
    normalize: bool


@dataclass
class _Conj:
    prompts: list[Any]
    weights: list[float]
    explicit: bool = False
    rest: str = ""  # what follows an explicit .and(...) (compel ignores it)


class _Fail(Exception):
    """This rule does not match here (pyparsing's ParseException: the next choice is tried)."""


def _unescape(text: str) -> str:
    """What compel's Fragment does to its text each time one is made (parsed, flattened, fused with a neighbour):
    ``\\(`` ``\\)`` ``\\"`` become the characters."""
    if '\\"' in text or "\\(" in text or "\\)" in text:
        text = text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')
    return text


def _fragment(text: str, free: bool = False) -> _Frag:
    return _Frag(_unescape(text), text if free else None)


def _memo(rule: Any) -> Any:
    """Each rule's result (or failure) at a position, kept: the ordered choices try the same rule at the same place
    again and again, which without this takes exponential time on nested brackets (pyparsing's packrat cache)."""
    def run(self: _Parser, i: int) -> Any:
        key = (rule.__name__, i)
        if key not in self.memo:
            try:
                self.memo[key] = rule(self, i)
            except _Fail:
                self.memo[key] = None
        got = self.memo[key]
        if got is None:
            raise _Fail
        return got

    return run


class _Parser:
    """compel's grammar over one string (pyparsing expands its tabs first)."""

    def __init__(self, text: str) -> None:
        self.s = text.expandtabs()
        self.n = len(self.s)
        self.memo: dict[tuple[str, int], Any] = {}

    # -- tokens ---------------------------------------------------------------------------------------------------
    def skip(self, i: int) -> int:
        while i < self.n and self.s[i] in WHITE:
            i += 1
        return i

    def literal(self, i: int, lit: str) -> int:
        i = self.skip(i)
        if not self.s.startswith(lit, i):
            raise _Fail
        return i + len(lit)

    def number(self, i: int) -> tuple[int, float]:
        i = self.skip(i)
        m = _REAL.match(self.s, i) or _INT.match(self.s, i)
        if not m:
            raise _Fail
        return m.end(), float(m.group(0))

    def keyword(self, i: int) -> tuple[int, str]:
        m = _KEYWORD.match(self.s, self.skip(i))
        if not m:
            raise _Fail
        return m.end(), m.group(0)

    @_memo
    def word(self, i: int) -> tuple[int, list[Any]]:
        """non_syntax_word: escapes, a sign joined to the next character, digits, anything not space or syntax."""
        s, n = self.s, self.n
        start = i = self.skip(i)
        while i < n:
            c = s[i]
            if c == "\\" and i + 1 < n and s[i + 1] in SYNTACTIC:
                i += 2
            elif (c in "+-" and i + 1 < n and s[i + 1] not in WHITE and s[i + 1] not in SYNTACTIC
                  or c not in STRING_WS and c not in SYNTACTIC):  # a sign joined to what follows; any other char
                i += 1
            else:
                break
        if i == start:
            raise _Fail
        return i, [_fragment(s[start:i])]

    def free_word(self, i: int) -> tuple[int, list[Any]]:
        j = i
        while j < self.n and self.s[j] not in STRING_WS:
            j += 1
        if j == i:
            raise _Fail
        return j, [_fragment(self.s[i:j], free=True)]

    def white(self, i: int) -> tuple[int, list[Any]]:
        j = i
        while j < self.n and self.s[j] in WHITE:
            j += 1
        if j == i:
            raise _Fail
        return j, []

    def quoted(self, i: int, inner: str) -> tuple[int, list[Any]]:
        """A double-quoted string, its content parsed again by the ``inner`` rule (compel's parse_fragment_str)."""
        i = self.skip(i)
        m = _QUOTED.match(self.s, i) if i < self.n and self.s[i] == '"' else None
        if not m:
            raise _Fail
        content = "".join(_WS_ESCAPES[g] if (g := u[1]) else _numeric_escape(g[1:]) if (g := u[2])
                          else g[-1] if (g := u[3]) else u[4] for u in _UNQUOTE.finditer(m.group(0)[1:-1]))
        content = content.replace('\\"', '"')
        if any(0xD800 <= ord(c) <= 0xDFFF for c in content):
            raise InputError(r"a \u escape in quotes makes an unpaired surrogate, which no tokenizer reads: write the "
                             "character itself")
        if not content.strip():
            return m.end(), [_Frag("")]
        sub = _Parser(content.replace('"', '\\"'))
        j, nodes = getattr(sub, inner)(0)
        if sub.skip(j) != sub.n:
            raise _Fail
        return m.end(), nodes

    # -- compel's rules -------------------------------------------------------------------------------------------
    def first(self, i: int, rules: tuple[Any, ...]) -> tuple[int, list[Any]]:
        """pyparsing's MatchFirst: the first rule that matches."""
        for rule in rules:
            try:
                return rule(i)
            except _Fail:
                pass
        raise _Fail

    def many(self, i: int, rules: tuple[Any, ...]) -> tuple[int, list[Any]]:
        """ZeroOrMore(MatchFirst(rules))."""
        out: list[Any] = []
        while True:
            try:
                i, nodes = self.first(i, rules)
            except _Fail:
                return i, out
            out += nodes

    @_memo
    def fragment_incl(self, i: int) -> tuple[int, list[Any]]:
        """A fragment that may hold commas and periods (inside brackets and quotes)."""
        return self.many(i, (self.lora, self.attention, self.swap, self.paren, self.quoted_fragment, self.word,
                             self.comma_or_period))

    @_memo
    def fragment_excl(self, i: int) -> tuple[int, list[Any]]:
        return self.many(i, (self.lora, self.attention, self.swap, self.paren, self.quoted_fragment, self.word))

    def comma_or_period(self, i: int) -> tuple[int, list[Any]]:
        i = self.skip(i)
        if i < self.n and self.s[i] in ",.":
            return i + 1, [_Frag(self.s[i])]
        raise _Fail

    @_memo
    def quoted_fragment(self, i: int) -> tuple[int, list[Any]]:
        return self.quoted(i, "fragment_incl")

    @_memo
    def quoted_prompt(self, i: int) -> tuple[int, list[Any]]:
        return self.quoted(i, "prompt")

    @_memo
    def paren(self, i: int) -> tuple[int, list[Any]]:
        i, nodes = self.fragment_incl(self.literal(i, "("))
        return self.literal(i, ")"), [nodes]

    @_memo
    def target(self, i: int) -> tuple[int, list[Any]]:
        """potential_operator_target: quoted, bracketed or one word."""
        return self.first(i, (self.quoted_fragment, self.paren, self.word))

    def weight_op(self, i: int) -> tuple[int, float]:
        """``+``s, ``-``s or a number."""
        j = self.skip(i)
        for sign, base in (("+", PLUS), ("-", MINUS)):
            k = j
            while k < self.n and self.s[k] == sign:
                k += 1
            if k > j:
                try:
                    return k, pow(base, k - j)
                except OverflowError:
                    raise InputError(f"{k - j} {sign} signs in a row overflow a weight: write a number, e.g. "
                                     "(words)1.5") from None
        return self.number(j)

    @_memo
    def attention(self, i: int) -> tuple[int, list[Any]]:
        try:  # explicit: target.attend(weight)
            j, target = self.target(i)
            j = self.literal(self.literal(j, ".attend"), "(")
            j, w = self.weight_op(j)
            return self.literal(j, ")"), [_Attn(w, target)]
        except _Fail:
            pass
        try:  # implicit: (bracketed)1.3, "quoted"+ ; no space before the weight
            j, target = self.first(i, (self.quoted_fragment, self.paren))
            if j < self.n and self.s[j] in WHITE:
                raise _Fail
            j, w = self.weight_op(j)
            return j, [_Attn(w, target)]
        except _Fail:
            pass
        j, target = self.word(i)  # word+ / word-- (signs only)
        if j >= self.n or self.s[j] not in "+-":
            raise _Fail
        j, w = self.weight_op(j)
        return j, [_Attn(w, target)]

    @_memo
    def swap(self, i: int) -> tuple[int, list[Any]]:
        j, target = self.target(i)
        j, _ = self.fragment_excl(self.literal(self.literal(j, ".swap"), "("))
        try:
            j, _ = self.options(self.literal(j, ","))
        except _Fail:
            pass
        return self.literal(j, ")"), [_Swap(target)]

    @_memo
    def lora(self, i: int) -> tuple[int, list[Any]]:
        j = self.skip(i)
        name = next((t for t in ("useLora", "withLora") if self.s.startswith(t, j)), None)
        if name is None:
            raise _Fail
        j, model = self.keyword(self.literal(j + len(name), "("))
        weight = 1.0
        try:
            j, weight = self.number(self.literal(j, ","))
        except _Fail:
            pass
        return self.literal(j, ")"), [_Lora(model, weight)]

    @_memo
    def option(self, i: int) -> tuple[int, list[Any]]:
        try:
            j, key = self.keyword(i)
            j = self.literal(j, "=")
            value: Any
            try:
                j, value = self.number(j)
            except _Fail:
                j, value = self.keyword(j)
            return j, [key, value]
        except _Fail:
            pass
        try:
            j, num = self.number(i)
            return j, [str(num)]
        except _Fail:
            j, key = self.keyword(i)
            return j, [key]

    def options(self, i: int) -> tuple[int, list[list[Any]]]:
        """Comma-separated options (weights, ``key=value``, flags), maybe none."""
        try:
            i, opt = self.option(i)
        except _Fail:
            return i, []
        out = [opt]
        while True:
            try:
                i, opt = self.option(self.literal(i, ","))
            except _Fail:
                return i, out
            out.append(opt)

    def targets(self, i: int) -> tuple[int, list[_Prompt]]:
        """``(a, "b c", ...)``: the prompts of a blend or conjunction."""
        i, nodes = self.first(self.literal(i, "("), (self.target, self.quoted_prompt))
        out = [_Prompt(nodes)]
        while True:
            try:
                i, nodes = self.first(self.literal(i, ","), (self.target, self.quoted_prompt))
            except _Fail:
                return self.literal(i, ")"), out
            out.append(_Prompt(nodes))

    def operator(self, i: int, names: tuple[str, ...]) -> tuple[int, str, list[_Prompt], list[list[Any]]]:
        i, prompts = self.targets(i)
        j = self.skip(i)
        name = next((t for t in names if self.s.startswith(t, j)), None)
        if name is None:
            raise _Fail
        i, opts = self.options(self.literal(j + len(name), "("))
        return self.literal(i, ")"), name, prompts, opts

    def blend(self, i: int) -> tuple[int, list[Any]]:
        i, _, prompts, opts = self.operator(i, (".blend",))
        normalize = not (opts and opts[-1][0] == "no_normalize")
        weights = [_weight(o[0], ".blend") for o in (opts if normalize else opts[:-1])] or [1.0] * len(prompts)
        if len(weights) != len(prompts):
            raise InputError(f"compel's .blend() has {len(prompts)} prompts but {len(weights)} weights: give one "
                             f"weight per prompt, e.g. (\"a cat\", \"a dog\").blend(0.7, 0.3)")
        return i, [_Blend(prompts, weights, normalize)]

    def explicit(self, i: int) -> _Conj:
        i, name, prompts, opts = self.operator(i, (".and", ".add"))
        weights = [_weight(o[0], name) for o in opts] or [1.0] * len(prompts)
        if len(weights) != len(prompts):
            raise InputError(f"compel's {name}() joins {len(prompts)} prompts but has {len(weights)} weights: give "
                             f"one weight per prompt, or none")
        return _Conj(prompts, weights, explicit=True, rest=self.s[i:])

    @_memo
    def prompt(self, i: int) -> tuple[int, list[Any]]:
        return self.many(i, (self.swap, self.lora, self.attention, self.quoted_fragment, self.paren, self.free_word,
                             self.white))

    def loras(self, i: int) -> tuple[int, list[Any]]:
        return self.many(i, (self.lora,))

    def implicit(self, i: int) -> _Conj:
        i, before = self.loras(i)
        try:
            i, main = self.blend(i)
            part: Any = main[0]
        except _Fail:
            i, nodes = self.prompt(i)
            part = _Prompt(nodes)
        i, after = self.loras(i)
        if self.skip(i) != self.n:
            raise _Fail
        return _Conj([_Prompt(before), part, _Prompt(after)], [1.0, 1.0, 1.0])

    def conjunction(self) -> _Conj:
        try:
            return self.explicit(0)
        except _Fail:
            return self.implicit(0)


def _numeric_escape(s: str) -> str:
    """pyparsing's unquoting of ``\\0``, ``\\ooo``, ``\\xhh``, ``\\uhhhh`` in a quoted string."""
    if s == "0":
        return "\0"
    if s.isdigit() and len(s) == 3:
        return chr(int(s, 8))
    if s.startswith(("u", "x")):
        return chr(int(s[1:], 16))
    return s


def _weight(text: Any, op: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"compel's {op}() takes numbers, got {text!r}: write e.g. {op}(0.7, 0.3)") from None


# -- flattening (compel's PromptParser.flatten) ---------------------------------------------------------------------

def _flatten(node: Any, scale: float, out: list[Any], loras: list[_Lora], raws: list[str]) -> None:
    if isinstance(node, list):
        for child in node:
            _flatten(child, scale, out, loras, raws)
    elif isinstance(node, _Attn):
        for child in node.children:
            _flatten(child, scale * node.weight, out, loras, raws)
    elif isinstance(node, _Lora):
        loras.append(node)
    elif isinstance(node, _Frag):
        if node.raw is not None:
            raws.append(node.raw)
        out.append((_unescape(node.text), 1.0 * scale))
    elif isinstance(node, _Swap):
        out.append(node)
    elif isinstance(node, _Prompt):
        frags: list[Any] = []
        _flatten(node.children, scale, frags, loras, raws)
        fused = _fuse(frags)
        if fused:
            out.append(fused)
    else:  # _Blend
        subs: list[Any] = []
        for p in node.prompts:
            _flatten(p, scale, subs, loras, raws)
        if len(subs) != len(node.weights):
            raise InputError(f"compel's .blend() has {len(subs)} prompts with text but {len(node.weights)} weights: "
                             "give each prompt some text")
        out.append(Blend(tuple(tuple(s) for s in subs), tuple(node.weights), node.normalize))


def _fuse(items: list[Any]) -> Any:
    """compel's fuse_fragments: neighbours of equal weight become one fragment, joined with a space."""
    out: list[Any] = []
    for x in items:
        if isinstance(x, _Swap) or not out or isinstance(out[-1], _Swap) or out[-1][1] != x[1]:
            out.append(x)
        else:
            out[-1] = (_unescape(out[-1][0] + " " + x[0]), out[-1][1])
    return out


@lru_cache(maxsize=512)
def parse_compel(text: str, strict: bool = True) -> CompelPrompt:
    """``text`` as compel's ``PromptParser.parse_conjunction`` reads it. InputError where compel raises, and (with
    ``strict``) where it would read brackets, quotes or operators as text or apply what sdrt does not (see the module
    docstring); ``.swap()`` (cross-attention control) is refused either way."""
    if not isinstance(text, str):
        raise InputError("prompts must be strings")
    original, text = text, re.sub(r",(\S)", r", \1", text)  # compel puts a space after every comma
    if not text.strip():
        return CompelPrompt(parts=((("", 1.0),),), weights=(1.0,))
    depth = max(_depths(text), default=0)
    if depth > MAX_DEPTH:
        raise InputError(f"the prompt nests brackets {depth} deep; compel's syntax here takes at most {MAX_DEPTH}: "
                         r"write fewer, or \( \) for the characters")
    p = _Parser(text)
    try:
        root = p.conjunction()
    except RecursionError:
        raise InputError(f"the prompt nests brackets or quotes too deep to parse; write fewer (at most "
                         f"{MAX_DEPTH} levels)") from None
    except _Fail:
        raise InputError(f"compel cannot parse {original!r}: text may not follow a .blend(...) (put it inside one of the "
                         "quoted prompts), and a vertical tab or form feed is not a space to compel") from None
    parts: list[Any] = []
    weights: list[float] = []
    loras: list[_Lora] = []
    raws: list[str] = []
    for prompt, weight in zip(root.prompts, root.weights, strict=True):
        got: list[Any] = []
        _flatten(prompt, 1.0, got, loras, raws)
        for part in got:
            if any(isinstance(f, _Swap) for frags in (part.prompts if isinstance(part, Blend) else [part])
                   for f in frags):
                raise InputError(f"{original!r}: compel's .swap() is cross-attention control, which sdrt does not run "
                                 "(compel's Compel encodes only the original words): write the prompt without it")
            parts.append(part if isinstance(part, Blend) else tuple(part))
        if got:
            weights.append(weight)
    if strict:
        _check_strict(original, root, parts, weights, loras, raws)
    return CompelPrompt(tuple(parts), tuple(weights), tuple((lo.name, lo.weight) for lo in loras))


def _check_strict(text: str, root: _Conj, parts: list[Any], weights: list[float], loras: list[_Lora],
                  raws: list[str]) -> None:
    """What compel reads as text, or applies in a way sdrt does not follow, refused with the fix."""
    for raw in raws:
        if any(op in raw for op in _OPERATORS):
            raise InputError(f"{text!r}: compel's .blend() and .and() take the whole prompt, each of its prompts in "
                             "quotes (compel reads this one as text): write e.g. (\"a cat\", \"a dog\").blend(0.7, 0.3)")
        for ch, name in (("(", "an unclosed or unreadable bracket"), (")", "an unmatched bracket"),
                         ('"', "an unclosed quote")):
            if _unescaped(raw, ch):
                fix = _FIX_BRACKETS if ch != '"' else r'close it, or write \" for the character'
                raise InputError(f"{text!r} has {name} ({raw!r}), which compel reads as text: {fix}")
    if root.explicit and root.rest.strip():
        raise InputError(f"{text!r}: compel ignores the text after .and(...) ({root.rest.strip()!r}): put it inside "
                         "one of the quoted prompts")
    if loras:
        raise InputError(f"{text!r}: compel's withLora()/useLora() are not applied by compel's Compel: leave them out "
                         "and pass the LoRA as loras=[(name, scale)] (--lora, the loras field)")
    if not parts:
        raise InputError(f"{text!r} has no text for compel to encode")
    frags = [f for part in parts for p in (part.prompts if isinstance(part, Blend) else [part]) for f in p]
    if not all(math.isfinite(w) for _, w in frags):
        raise InputError(f"{text!r}: the nested weights multiply past what a float holds: use fewer or smaller")
    for part in parts:
        if isinstance(part, Blend) and (not all(math.isfinite(w) for w in part.weights)
                                        or part.normalize and sum(part.weights) == 0):
            raise InputError(f"{text!r}: the .blend() weights {list(part.weights)} must be finite numbers "
                                 "and (normalized) not sum to 0")
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"{text!r}: the .and() weights {weights} must be finite numbers")


def _depths(text: str) -> Any:
    """The bracket depth after each character (escaped brackets are characters)."""
    depth = 0
    for i, c in enumerate(text):
        if c in "()" and (i == 0 or text[i - 1] != "\\"):
            depth = depth + 1 if c == "(" else max(0, depth - 1)
        yield depth


def _unescaped(text: str, ch: str) -> bool:
    return any(c == ch and (i == 0 or text[i - 1] != "\\") for i, c in enumerate(text))
