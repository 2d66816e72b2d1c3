"""Dynamic prompts, A1111's most used prompt extension, through the `dynamicprompts` library.

    {red|blue|green} circle          one of the variants
    {0.5::red|2::blue} circle        weighted variants
    {2$$red|blue|green} circle       two of them, joined by ", "
    __colors__ circle                a line of colors.txt in the wildcard folder (__shapes/round__: a subfolder)

A template is resolved either per image, from that image's seed (`resolve`: the same seed gives the same
prompt), or into every combination (`combinations`). The grammar is the library's; t2i only checks a
template before any model loads (`check`: a parse error or a wildcard with no file is one line) and
records the template beside the resolved prompt (`Settings.prompt_template`).
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import lru_cache
from pathlib import Path

from t2i.errors import UsageError

MODES = ("off", "random", "combinatorial")
MAX_COMBINATIONS = 1000  # --combinatorial refuses a template with more (each is at least one image)


class _MissingWildcard(Exception):
    pass


@lru_cache(maxsize=1)
def _library():
    """dynamicprompts' pieces, imported on first use (pyparsing builds its grammar then; `t2i --help` skips it)."""
    from dynamicprompts.commands import Command, LiteralCommand, SequenceCommand, WildcardCommand
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from dynamicprompts.parser.parse import parse
    from dynamicprompts.wildcards import WildcardManager

    class StrictWildcards(WildcardManager):
        """A wildcard that matches no file is an error, not the library's fallback of the literal `__name__`."""

        def get_values(self, wildcard: str):
            values = super().get_values(wildcard)
            if len(values) == 0:
                raise _MissingWildcard(wildcard)
            return values

    return dict(Command=Command, Literal=LiteralCommand, Sequence=SequenceCommand, Wildcard=WildcardCommand,
                Combinatorial=CombinatorialPromptGenerator, Random=RandomPromptGenerator, parse=parse,
                Wildcards=StrictWildcards)


@lru_cache(maxsize=8)
def _wildcards(folder: str | None):
    return _library()["Wildcards"](folder)


def _quiet(fn, *args, **kwargs):
    """Call into the library without pyparsing's deprecation warnings about the library's own code (nothing a
    user can act on), turning its errors into one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return fn(*args, **kwargs)
        except _MissingWildcard as e:
            raise UsageError(_missing(str(e))) from None
        except Exception as e:  # pyparsing's ParseException and the library's ValueErrors
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"the prompt is not a valid dynamic prompt ({' '.join(str(e).split())}); "
                             r"write a literal { or } as \{ or \}, or pass --no-dynamic-prompts") from None


@lru_cache(maxsize=256)
def _parse(text: str):
    """A template's parsed commands (immutable), kept: a grid checks the same template once per cell."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _library()["parse"](text)


def _missing(name: str) -> str:
    return f"no wildcard file for __{name}__; add {name}.txt (one value a line) to the --wildcard-dir folder"


def _commands(command, Command):
    """Every command in a parsed template (variants, their options, wraps, sequences), depth first."""
    yield command
    for f in dataclasses.fields(command):
        value = getattr(command, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, Command):
                yield from _commands(item, Command)
            elif dataclasses.is_dataclass(item) and not isinstance(item, type):  # a variant option: (value, weight)
                for g in dataclasses.fields(item):
                    if isinstance(getattr(item, g.name), Command):
                        yield from _commands(getattr(item, g.name), Command)


def is_template(prompt: str) -> bool:
    """Whether dynamic prompts would change the prompt (variants, wildcards, escapes); an unparsable prompt with
    a brace or `__` is a template too (`check` then says what is wrong)."""
    if "{" not in prompt and "__" not in prompt:
        return False  # no variant, wildcard or variable: as written ("price $5" too), without the grammar
    lib = _library()
    try:
        command = _parse(prompt)
    except Exception:  # pyparsing's ParseException and the library's own errors
        return True
    literal = all(isinstance(c, (lib["Literal"], lib["Sequence"])) for c in _commands(command, lib["Command"]))
    return not literal or combinations(prompt, None, 2) != [prompt]


def check(prompt: str, wildcard_dir: str | Path | None = None) -> None:
    """A template parses and every wildcard it names has a file (also the wildcards inside those files)."""
    if wildcard_dir is not None and not Path(wildcard_dir).is_dir():
        raise UsageError(f"--wildcard-dir {wildcard_dir} is not a folder")
    lib = _library()
    manager = _wildcards(str(wildcard_dir) if wildcard_dir else None)
    seen: set[str] = set()

    def walk(text: str) -> None:
        for command in _commands(_quiet(_parse, text), lib["Command"]):
            if isinstance(command, lib["Wildcard"]) and isinstance(command.wildcard, str):
                name = command.wildcard
                if name in seen:
                    continue
                seen.add(name)
                if ".." in name.split("/") or name.startswith("/"):
                    raise UsageError(f"the wildcard __{name}__ points outside --wildcard-dir; name a file in it")
                if wildcard_dir is None:
                    raise UsageError(f"the prompt uses the wildcard __{name}__; give the folder of {name}.txt "
                                     "with --wildcard-dir")
                for value in _quiet(manager.get_values, name).string_values:
                    walk(value)

    walk(prompt)


def combinations(prompt: str, wildcard_dir: str | Path | None = None, limit: int = MAX_COMBINATIONS) -> list[str]:
    """Every prompt the template makes (`--combinatorial`); more than `limit` is refused."""
    generator = _library()["Combinatorial"](_wildcards(str(wildcard_dir) if wildcard_dir else None))
    prompts = _quiet(generator.generate, prompt, max_prompts=limit + 1)
    if len(prompts) > limit:
        raise UsageError(f"the prompt makes more than {limit} combinations; use fewer variants or wildcard "
                         "values, or leave out --combinatorial (one random combination per image)")
    return prompts


def resolve(prompt: str, seed: int, wildcard_dir: str | Path | None = None) -> str:
    """The template's random prompt for the image of this seed: the same seed gives the same prompt."""
    return resolve_many(prompt, [seed], wildcard_dir)[0]


def resolve_many(prompt: str, seeds: list[int], wildcard_dir: str | Path | None = None) -> list[str]:
    """`resolve` for several seeds, parsing the template once (pyparsing is slow: tens of ms a parse); each
    prompt is the one `resolve` gives its seed alone."""
    generator = _library()["Random"](_wildcards(str(wildcard_dir) if wildcard_dir else None))
    return _quiet(generator.generate, prompt, len(seeds), seeds=list(seeds))
