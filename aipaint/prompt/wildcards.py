"""Dynamic prompts: ``{a|b|c}`` variants and ``__name__`` wildcards, as the sd-dynamic-prompts
extension of the A1111 web UI writes them, resolved into plain prompts before generation.

The syntax (see docs/workflows.md):

- ``{a|b|c}`` one of the options; ``{0.5::a|2::b}`` weighted (random mode only);
- ``{2$$a|b|c}`` two different options joined by ``", "``; ``{1-3$$a|b|c}`` one to three;
  ``{-2$$…}`` up to two, ``{2-$$…}`` two or more; ``{2$$ and $$a|b|c}`` joined by ``" and "``;
- ``__name__`` a line of the file ``name.txt`` in the wildcards folder (``__folder/name__`` for
  ``folder/name.txt``; ``__colours*__`` any file the pattern matches). Blank lines and lines
  starting with ``#`` are skipped; a line may hold variants and wildcards itself.
  ``{2$$__name__}`` picks two different lines;
- ``\\{``, ``\\}`` and ``\\|`` are the characters themselves. Any other text, A1111's ``(a:1.2)``,
  ``[a|b]``, ``[a:b:0.5]`` and ``<lora:…>`` included, is kept as it is; a ``|`` inside ``[…]``
  within a variant stays A1111's alternation and does not split the variant.

Resolution is random, from a :class:`random.Random` seeded with the image's seed (the same
seed gives the same prompt), or combinatorial: every combination in order, the last choice
varying fastest, at most a given number. Parsing is one pass over the text (linear time);
every resolved prompt is at most :data:`~aipaint.api.request.MAX_PROMPT_CHARS` long, which
bounds the work of nested wildcards too. Wildcard names never reach outside their folder:
absolute paths, ``..`` and links that lead out are refused with
:class:`~aipaint.plugin.kit.folders.NameOutsideFolder`.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aipaint.errors import InvalidParameter
from aipaint.plugin.kit.folders import NameOutsideFolder, check_name, default_folder, is_inside, path_is

__all__ = [
    "DEFAULT_MAX_PROMPTS",
    "DynamicPrompts",
    "MAX_NESTING",
    "WildcardFolder",
    "default_wildcards_folder",
    "expand_prompt",
    "has_dynamic_syntax",
    "parse_template",
    "resolve_prompt",
]

MAX_NESTING = 40
"""Variants and wildcards may nest at most this deep (a wildcard that names itself ends here)."""
DEFAULT_MAX_PROMPTS = 100
"""The combinatorial mode's default cap on the number of prompts."""
MAX_PROMPTS = 10_000
"""The cap the combinatorial mode never goes past, whatever the caller asks."""
MAX_WILDCARD_BYTES = 4 * 2**20
"""A wildcard file is a list of words someone wrote; a larger one is refused."""
MAX_COUNT_DIGITS = 6
MAX_STEPS = 1_000_000
"""The work one template may take to resolve: parts visited and combinations joined."""

_TOKEN = re.compile(
    r"\\[\\{}|\[\]()]"  # escapes: \{ \} \| are the characters; \\ \[ \] \( \) stay for A1111's parser
    r"|[{}|\[\]]"
    r"|__(?P<name>[^\s{}|()\[\]<>:,_\\][^\s{}|()\[\]<>:,\\]*?)__"
)
_HEADER = re.compile(
    rf"(?:(?P<low>\d{{1,{MAX_COUNT_DIGITS}}})(?P<dash>-(?P<high>\d{{0,{MAX_COUNT_DIGITS}}}))?"
    rf"|-(?P<upto>\d{{1,{MAX_COUNT_DIGITS}}}))\$\$(?:(?P<joiner>[^{{}}|$]*)\$\$)?"
)
_WEIGHT = re.compile(r"[ \t]*(?P<weight>\d{1,9}(?:\.\d{0,9})?|\.\d{1,9})[ \t]*::")


def default_wildcards_folder() -> Path:
    """``$AIPAINT_WILDCARDS`` if set, else ``$AIPAINT_HOME/wildcards`` (``~/.aipaint/wildcards``)."""
    return default_folder("AIPAINT_WILDCARDS", "wildcards")


# --- the parsed template --------------------------------------------------------------------
@dataclass(frozen=True)
class Wildcard:
    """``__name__``: a line of a wildcard file (``name`` may be a glob pattern)."""

    name: str


@dataclass(frozen=True)
class Variant:
    """``{…}``: ``low`` to ``high`` different options (``high`` None: up to all), joined by ``joiner``."""

    options: tuple[tuple, ...]
    weights: tuple[float, ...]
    low: int = 1
    high: int | None = 1
    joiner: str = ", "


Part = str | Wildcard | Variant
"""A template is a tuple of parts: text, wildcards and variants."""


def has_dynamic_syntax(text: str) -> bool:
    """Whether ``text`` may hold a variant or a wildcard (a quick test, no parse)."""
    return "{" in text or "}" in text or "__" in text


class _Frame:
    __slots__ = ("parts", "text", "options", "weights", "low", "high", "joiner", "square", "start")

    def __init__(self, start: int) -> None:
        self.parts: list[Part] = []
        self.text: list[str] = []  # text since the last part, joined once (adding to a str each time is quadratic)
        self.options: list[tuple] = []
        self.weights: list[float] = []
        self.low, self.high, self.joiner = 1, 1, ", "
        self.square = 0  # A1111 [ ] open inside this variant: a | there is alternation, not a split
        self.start = start


    def add(self, part: Part) -> None:
        self.flush()
        self.parts.append(part)

    def flush(self) -> None:
        """Add the pending text as one part."""
        if self.text:
            joined = "".join(self.text)
            self.text = []
            if joined:
                self.parts.append(joined)

    def option(self) -> tuple[Part, ...]:
        """The parts of the option that ends here; the next one starts empty."""
        self.flush()
        parts, self.parts = tuple(self.parts), []
        return parts


def _option_start(text: str, position: int, frame: _Frame) -> int:
    """Read an option's ``weight::`` at ``position``; the position after it."""
    match = _WEIGHT.match(text, position)
    if match is None:
        frame.weights.append(1.0)
        return position
    frame.weights.append(float(match["weight"]))
    return match.end()


def parse_template(text: str, what: str = "prompt") -> tuple[Part, ...]:
    """The parts of a dynamic prompt, in one pass over ``text``. A ``{`` without its ``}``, a
    ``}`` without its ``{`` and nesting deeper than :data:`MAX_NESTING` are
    :class:`~aipaint.errors.InvalidParameter` naming ``what``."""
    if not isinstance(text, str):
        raise InvalidParameter(what, text, "must be text")
    root = _Frame(0)
    stack = [root]
    position = 0
    while True:
        match = _TOKEN.search(text, position)
        frame = stack[-1]
        if match is None:
            frame.text.append(text[position:])
            break
        frame.text.append(text[position : match.start()])
        token, position = match.group(), match.end()
        if match["name"] is not None:
            frame.add(Wildcard(match["name"]))
        elif token[0] == "\\":
            frame.text.append(token[1] if token[1] in "{}|" else token)
        elif token == "{":
            if len(stack) > MAX_NESTING:
                raise InvalidParameter(what, text, f"nests variants {{…}} more than {MAX_NESTING} deep",
                                       "write a literal brace as \\{")
            inner = _Frame(match.start())
            header = _HEADER.match(text, position)
            if header is not None:
                inner.low, inner.high = _bounds(header, text, what)
                if header["joiner"] is not None:
                    inner.joiner = header["joiner"]
                position = header.end()
            position = _option_start(text, position, inner)
            stack.append(inner)
        elif token == "}":
            if len(stack) == 1:
                raise InvalidParameter(what, text, f"has a '}}' at character {match.start() + 1} that closes no '{{'",
                                       "write a literal brace as \\}")
            stack.pop()
            frame.options.append(frame.option())
            stack[-1].add(Variant(tuple(frame.options), tuple(frame.weights), frame.low, frame.high, frame.joiner))
        elif token == "|" and len(stack) > 1 and frame.square == 0:
            frame.options.append(frame.option())
            position = _option_start(text, position, frame)
        else:  # "|" outside a variant (A1111's alternation), "[" or "]": text
            if len(stack) > 1 and token in "[]":
                frame.square = frame.square + 1 if token == "[" else max(0, frame.square - 1)
            frame.text.append(token)
    if len(stack) > 1:
        raise InvalidParameter(what, text, f"has a '{{' at character {stack[-1].start + 1} that is never closed",
                               "close it with '}', or write a literal brace as \\{")
    return root.option()


def _bounds(header: re.Match, text: str, what: str) -> tuple[int, int | None]:
    if header["upto"] is not None:
        return 1, int(header["upto"])
    low = int(header["low"])
    if header["dash"] is None:
        return low, low
    high = int(header["high"]) if header["high"] else None
    if high is not None and high < low:
        raise InvalidParameter(what, text, f"asks for {low}-{high} options: the first number must not be above the second")
    return low, high


# --- wildcard files ---------------------------------------------------------------------------
class WildcardFolder:
    """A folder of wildcard files: ``name`` is ``<root>/name.txt``, one option a line.

    Every name is checked before anything is opened: absolute paths, ``..``, ``~`` and
    links whose target lies outside the folder are refused. Files are read once per object.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._lines: dict[str, tuple[str, ...]] = {}
        self._parsed: dict[str, tuple[tuple[Part, ...], ...]] = {}
        self._names: list[str] | None = None

    def __repr__(self) -> str:
        return f"WildcardFolder({str(self.root)!r})"

    def _check_root(self) -> None:
        if not path_is(Path.is_dir, self.root):
            raise InvalidParameter("wildcards folder", str(self.root), "is not a folder",
                                   "create it and put NAME.txt files in it, or pass another with --wildcards DIR")

    def names(self) -> list[str]:
        """Every wildcard name in the folder (``folder/name``), sorted; links leading out are left out."""
        if self._names is None:
            self._check_root()
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
                dirnames.sort()
                for filename in filenames:
                    path = Path(dirpath) / filename
                    if path.suffix.lower() == ".txt" and path.is_file() and is_inside(path, self.root):
                        found.append(path.relative_to(self.root).with_suffix("").as_posix())
            self._names = sorted(found)
        return self._names

    def lines(self, name: str) -> tuple[str, ...]:
        """The options of ``__name__``: the file's lines (or, for a pattern with ``*``, the lines
        of every file it matches), without blank lines and ``#`` comments."""
        if name in self._lines:
            return self._lines[name]
        relative = check_name("wildcard", name, self.root, "__colours__ for colours.txt")
        if "*" in name or "?" in name:
            pattern = relative.as_posix()
            matched = [n for n in self.names() if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise InvalidParameter("wildcard", name, f"matches no wildcard file in {self.root}", self._close(name))
            lines = tuple(line for n in matched for line in self.lines(n))
        else:
            self._check_root()
            path = self.root / f"{relative.as_posix()}.txt"
            if not path_is(Path.is_file, path):
                raise InvalidParameter("wildcard", name, f"has no file {relative.as_posix()}.txt in {self.root}", self._close(name))
            if not is_inside(path, self.root):
                raise NameOutsideFolder("wildcard", name, self.root, "it is a link to a file outside the folder",
                                        "__colours__ for colours.txt")
            lines = self._read(name, path)
        self._lines[name] = lines
        return lines

    def parsed(self, name: str) -> tuple[tuple[Part, ...], ...]:
        """The options of ``__name__``, each parsed (a line may hold variants and wildcards)."""
        if name not in self._parsed:
            self._parsed[name] = tuple(parse_template(line, f"wildcard __{name}__") for line in self.lines(name))
        return self._parsed[name]

    def _close(self, name: str) -> str:
        import difflib

        try:
            close = difflib.get_close_matches(name, self.names(), n=3)
        except InvalidParameter:
            return "create the folder and the file"
        return f"did you mean {', '.join(close)}?" if close else f"wildcards here: {', '.join(self.names()[:8]) or 'none'}"

    def _read(self, name: str, path: Path) -> tuple[str, ...]:
        try:
            size = path.stat().st_size
            if size > MAX_WILDCARD_BYTES:
                raise InvalidParameter("wildcard", name, f"is a file of {size:,} bytes, more than {MAX_WILDCARD_BYTES:,}")
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidParameter("wildcard", name, f"is not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise InvalidParameter("wildcard", name, f"cannot be read ({exc.strerror or exc})") from None
        lines = tuple(line.strip() for line in text.splitlines())
        lines = tuple(line for line in lines if line and not line.startswith("#"))
        if not lines:
            raise InvalidParameter("wildcard", name, f"{path.name} holds no options (blank and # lines are skipped)")
        return lines


# --- resolving --------------------------------------------------------------------------------
class _Budget:
    """Bounds the text one resolved prompt may hold, so nested wildcards cannot grow without end."""

    def __init__(self, template: str, what: str) -> None:
        from aipaint.api.request import MAX_PROMPT_CHARS

        self.limit, self.template, self.what = MAX_PROMPT_CHARS, template, what
        self.steps = 0

    def step(self, count: int = 1) -> None:
        """Count work: wildcards that resolve to little text can still nest into a vast tree."""
        self.steps += count
        if self.steps > MAX_STEPS:
            raise InvalidParameter(self.what, self.template, f"takes more than {MAX_STEPS:,} steps to resolve",
                                   "its wildcards nest too many wildcards each")

    def check(self, text: str, size: int | None = None) -> str:
        if (len(text) if size is None else size) > self.limit:
            raise InvalidParameter(self.what, self.template, f"resolves to more than {self.limit} characters")
        return text


class DynamicPrompts:
    """Resolves dynamic prompts against a wildcards folder (None: wildcards are an error).

    >>> dp = DynamicPrompts("wildcards/")
    >>> dp.resolve("a {red|blue} __shape__", seed=1)      # random, the same for the same seed
    >>> dp.expand("a {red|blue} {circle|square}")          # every combination, at most max_prompts
    """

    def __init__(self, wildcards: str | Path | WildcardFolder | None = None) -> None:
        if wildcards is None or isinstance(wildcards, WildcardFolder):
            self.folder = wildcards
        else:
            self.folder = WildcardFolder(wildcards)

    def __repr__(self) -> str:
        return f"DynamicPrompts({self.folder!r})"

    def _wildcard(self, node: Wildcard, trail: tuple[str, ...], what: str) -> tuple[tuple[Part, ...], ...]:
        if self.folder is None:
            raise InvalidParameter(what, f"__{node.name}__", "names a wildcard, but no wildcards folder was given",
                                   "pass --wildcards DIR (wildcards=DIR), or write it as \\_\\_ if it is text")
        if node.name in trail:
            raise InvalidParameter("wildcard", node.name, "refers to itself: " + " -> ".join((*trail, node.name)))
        if len(trail) >= MAX_NESTING:
            raise InvalidParameter("wildcard", node.name, f"is nested more than {MAX_NESTING} wildcards deep")
        return self.folder.parsed(node.name)

    def _options(self, node: Variant, trail: tuple[str, ...], what: str) -> tuple[tuple[tuple, ...], tuple[float, ...], tuple[str, ...]]:
        """A variant's options; ``{2$$__name__}`` takes the wildcard's lines as its options."""
        if len(node.options) == 1 and len(node.options[0]) == 1 and isinstance(node.options[0][0], Wildcard):
            wildcard = node.options[0][0]
            lines = self._wildcard(wildcard, trail, what)
            return lines, (1.0,) * len(lines), (*trail, wildcard.name)
        return node.options, node.weights, trail

    def check(self, template: str, *, what: str = "prompt") -> None:
        """Raise now what resolving ``template`` could raise on any draw: bad syntax, and every wildcard
        it names (in variants too, not inside the wildcard files) missing, unreadable or outside the folder."""
        pending: list[tuple[Part, ...]] = [parse_template(template, what)]
        while pending:
            for part in pending.pop():
                if isinstance(part, Wildcard):
                    self._wildcard(part, (), what)
                elif isinstance(part, Variant):
                    pending.extend(part.options)

    # random ------------------------------------------------------------------------------------
    def resolve(self, template: str, seed: int, *, what: str = "prompt") -> str:
        """One prompt: each choice drawn by a :class:`random.Random` seeded with ``seed``."""
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidParameter("seed", seed, "must be an integer")
        parts = parse_template(template, what)
        if not any(not isinstance(part, str) for part in parts):
            return "".join(parts)  # type: ignore[arg-type]
        budget = _Budget(template, what)
        return budget.check(self._pick(parts, random.Random(seed), (), 0, budget, what))

    def _pick(self, parts: Sequence[Part], rng: random.Random, trail: tuple[str, ...], depth: int,
              budget: _Budget, what: str) -> str:
        if depth > MAX_NESTING:
            raise InvalidParameter(what, budget.template, f"nests variants and wildcards more than {MAX_NESTING} deep")
        out: list[str] = []
        size = 0
        budget.step(len(parts) + 1)
        for part in parts:
            if isinstance(part, str):
                text = part
            elif isinstance(part, Wildcard):
                lines = self._wildcard(part, trail, what)
                text = self._pick(rng.choice(lines), rng, (*trail, part.name), depth + 1, budget, what)
            else:
                options, weights, inner = self._options(part, trail, what)
                chosen = _choose(rng, len(options), weights, part.low, part.high)
                text = part.joiner.join(self._pick(options[i], rng, inner, depth + 1, budget, what) for i in chosen)
            size += len(text)
            budget.check(text, size)
            out.append(text)
        return "".join(out)

    # combinatorial -------------------------------------------------------------------------------
    def expand(self, template: str, limit: int = DEFAULT_MAX_PROMPTS, *, what: str = "prompt") -> list[str]:
        """Every prompt the template can make, in order (the last choice varies fastest), at most
        ``limit`` of them (see :meth:`count_at_most` for whether there are more)."""
        return list(itertools.islice(self._prompts(template, limit, what), limit))

    def count_at_most(self, template: str, limit: int, *, what: str = "prompt") -> int:
        """How many prompts the template makes, counted up to ``limit + 1`` (more than ``limit``)."""
        return sum(1 for _ in itertools.islice(self._prompts(template, limit + 1, what), limit + 1))

    def _prompts(self, template: str, limit: int, what: str) -> Iterator[str]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PROMPTS + 1:
            raise InvalidParameter("max_prompts", limit, f"must be an integer from 1 to {MAX_PROMPTS}")
        parts = parse_template(template, what)
        budget = _Budget(template, what)
        for text in self._all(parts, (), 0, limit, budget, what):
            yield budget.check(text)

    def _all(self, parts: Sequence[Part], trail: tuple[str, ...], depth: int, limit: int,
             budget: _Budget, what: str) -> list[str]:
        """The first ``limit`` texts ``parts`` make (each part's own list is cut at ``limit`` too)."""
        if depth > MAX_NESTING:
            raise InvalidParameter(what, budget.template, f"nests variants and wildcards more than {MAX_NESTING} deep")
        choices: list[list[str]] = []
        budget.step(len(parts) + 1)
        for part in parts:
            if isinstance(part, str):
                choices.append([part])
            elif isinstance(part, Wildcard):
                lines = self._wildcard(part, trail, what)
                inner = (*trail, part.name)
                choices.append(_first(itertools.chain.from_iterable(
                    self._all(line, inner, depth + 1, limit, budget, what) for line in lines), limit))
            else:
                options, _, inner = self._options(part, trail, what)
                choices.append(_first(self._variant_texts(part, options, inner, depth, limit, budget, what), limit))
        texts = [budget.check("".join(combo)) for combo in itertools.islice(itertools.product(*choices), limit)]
        budget.step(len(texts))
        return texts

    def _variant_texts(self, node: Variant, options: Sequence[tuple], trail: tuple[str, ...], depth: int,
                       limit: int, budget: _Budget, what: str) -> Iterator[str]:
        texts: dict[int, list[str]] = {}

        def of(index: int) -> list[str]:
            if index not in texts:
                texts[index] = self._all(options[index], trail, depth + 1, limit, budget, what)
            return texts[index]

        low, high = _clamp(len(options), node.low, node.high)
        for count in range(low, high + 1):
            for chosen in itertools.combinations(range(len(options)), count):
                for combo in itertools.product(*(of(i) for i in chosen)):
                    yield node.joiner.join(combo)


def _first(items: Iterator[str] | itertools.chain, limit: int) -> list[str]:
    return list(itertools.islice(items, limit))


def _clamp(count: int, low: int, high: int | None) -> tuple[int, int]:
    """How many options to take, as sd-dynamic-prompts does: never more than there are."""
    high = count if high is None else min(high, count)
    return min(low, high), high


def _choose(rng: random.Random, count: int, weights: Sequence[float], low: int, high: int | None) -> list[int]:
    """Draw a number of options from ``low``-``high``, then that many different ones by weight."""
    low, high = _clamp(count, low, high)
    wanted = low if low == high else rng.randint(low, high)
    if all(weight == weights[0] for weight in weights):
        return rng.sample(range(count), wanted)
    remaining, chosen = list(range(count)), []
    for _ in range(wanted):
        pool = [weights[i] for i in remaining]
        if not sum(pool) > 0:
            index = rng.randrange(len(remaining))
        else:
            index = rng.choices(range(len(remaining)), weights=pool)[0]
        chosen.append(remaining.pop(index))
    return chosen


# --- one-call helpers ---------------------------------------------------------------------------
def resolve_prompt(template: str, seed: int, wildcards: str | Path | WildcardFolder | None = None) -> str:
    """``template`` with every variant and wildcard drawn at random from ``seed``."""
    return DynamicPrompts(wildcards).resolve(template, seed)


def expand_prompt(template: str, wildcards: str | Path | WildcardFolder | None = None,
                  limit: int = DEFAULT_MAX_PROMPTS) -> list[str]:
    """Every prompt ``template`` makes (combinatorial), at most ``limit``."""
    return DynamicPrompts(wildcards).expand(template, limit)
