"""The five sample types users bring (gdGPT's JSON shapes) as typed records, validated on read.

    pretrain        {"text"}
    instruct        {"instruct", "input"?, "output"}
    conversation    {"rounds": [["ask"|"ans", text], ...]}
    conver_has_api  {"api_desc", "rounds"} where a round may be
                    ["ans-api", {"actions": [{inner_thought, api_name, api_param, api_res}], "ans"}]
    ref_qa          {"reference", "rounds"}
Every type but pretrain may carry "system" (a system prompt; the chat template's system role).

What is accepted (and why):
- Extra keys are ignored (datasets often carry ids or sources).
- instruct: a missing, null or empty "input" means no input; likewise "system" for every type.
- rounds: start with "ask"; consecutive "ask" turns are merged into one user turn (joined by a
  newline), as gdGPT's own example has them; an answer ("ans", or "ans-api" in conver_has_api)
  must follow an ask (two answers in a row are an error: nothing tells who said the second);
  the last round must be an answer, so every conversation has at least one.
- api_param and api_res may be a string or any JSON value (rendered as compact JSON);
  inner_thought may be empty; an "ans-api" needs at least one action and a non-empty "ans".
- Texts that the model learns to produce (text, output, ans) must be non-empty.

Any violation raises SampleError (a ValueError) naming file, sample index and field, in one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Union

SAMPLE_TYPES = ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa")


class SampleError(ValueError):
    """A malformed sample or data file, on one line: `file: line L: sample I: field 'F': problem`
    (line: as an editor shows it, when known; index and field: None for a file-level problem)."""

    def __init__(self, file: str, index: int | None, field: str | None, problem: str, line: int | None = None):
        self.file, self.index, self.field, self.problem, self.line = file, index, field, problem, line
        where = [f"line {line}"] * (line is not None) + [f"sample {index}"] * (index is not None) + \
            [f"field '{field}'"] * (field is not None)
        super().__init__(": ".join([file, *where, problem]))

    def __reduce__(self):  # survives the trip back from a tokenizing worker process
        return SampleError, (self.file, self.index, self.field, self.problem, self.line)


@dataclass(frozen=True)
class Pretrain:
    text: str


@dataclass(frozen=True)
class Instruct:
    instruct: str
    output: str  # "" only in a generation prompt (render_prompt)
    input: str = ""
    system: str = ""


@dataclass(frozen=True)
class Ask:
    text: str
    # the consecutive "ask" rounds merged into `text`: only gdGPT's layout renders them apart
    parts: tuple[str, ...] = field(default=(), compare=False)

    @property
    def asks(self) -> tuple[str, ...]:
        return self.parts or (self.text,)


@dataclass(frozen=True)
class Answer:
    text: str


@dataclass(frozen=True)
class ApiAction:
    inner_thought: str
    api_name: str
    api_param: str  # compact JSON when the sample gave an object
    api_res: str  # produced by the tool: context, never a target
    # api_res was a JSON value (compact here; only gdGPT's layout renders it indented)
    api_res_json: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class ApiAnswer:
    actions: tuple[ApiAction, ...]
    ans: str


Turn = Union[Ask, Answer, ApiAnswer]


@dataclass(frozen=True)
class Conversation:
    rounds: tuple[Turn, ...]
    system: str = ""


@dataclass(frozen=True)
class ConverHasApi:
    api_desc: str
    rounds: tuple[Turn, ...]
    system: str = ""


@dataclass(frozen=True)
class RefQA:
    reference: str
    rounds: tuple[Turn, ...]
    system: str = ""


Sample = Union[Pretrain, Instruct, Conversation, ConverHasApi, RefQA]
TYPE_OF = {Pretrain: "pretrain", Instruct: "instruct", Conversation: "conversation", ConverHasApi: "conver_has_api",
           RefQA: "ref_qa"}


class _Checker:
    """Field access that turns every problem into a SampleError at (file, index, field path)."""

    def __init__(self, file: str, index: int, line: int | None = None):
        self.file, self.index, self.line = file, index, line

    def fail(self, field: str, problem: str):
        raise SampleError(self.file, self.index, field, problem, self.line)

    def get(self, obj: dict, key: str, field: str, kind, required: bool = True):
        if key not in obj or obj[key] is None:
            if required:
                self.fail(field, "missing")
            return None
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            self.fail(field, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def text(self, obj: dict, key: str, field: str, *, required=True, non_empty=False) -> str:
        value = self.get(obj, key, field, str, required)
        if non_empty and not (value or "").strip():
            self.fail(field, "empty")
        return value or ""

    def json_text(self, obj: dict, key: str, field: str) -> str:
        """A string, or any JSON value rendered compactly (api_param / api_res)."""
        if key not in obj:
            self.fail(field, "missing")
        value = obj[key]
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _kind_name(kind) -> str:
    return {str: "string", list: "list", dict: "object"}.get(kind, getattr(kind, "__name__", str(kind)))


def parse_sample(obj: Any, file: str = "<sample>", index: int = 0, *, for_prompt: bool = False,
                 line: int | None = None) -> Sample:
    """Validate one JSON sample into a typed record.

    for_prompt: a generation prompt (demo.py): instruct may lack "output" and rounds must end
    with an "ask" instead of an answer. line: where the sample starts in its file (for messages).
    """
    c = _Checker(file, index, line)
    if not isinstance(obj, dict):
        c.fail("type", f"sample must be an object, got {type(obj).__name__}")
    kind = c.get(obj, "type", "type", str)
    if kind == "pretrain":
        return Pretrain(c.text(obj, "text", "text", non_empty=True))
    system = c.text(obj, "system", "system", required=False)
    if kind == "instruct":
        return Instruct(instruct=c.text(obj, "instruct", "instruct", non_empty=True),
                        input=c.text(obj, "input", "input", required=False),
                        output=c.text(obj, "output", "output", required=not for_prompt, non_empty=not for_prompt),
                        system=system)
    if kind == "conversation":
        return Conversation(_rounds(c, obj, allow_api=False, for_prompt=for_prompt), system)
    if kind == "conver_has_api":
        return ConverHasApi(c.text(obj, "api_desc", "api_desc", non_empty=True),
                            _rounds(c, obj, allow_api=True, for_prompt=for_prompt), system)
    if kind == "ref_qa":
        return RefQA(c.text(obj, "reference", "reference", non_empty=True),
                     _rounds(c, obj, allow_api=False, for_prompt=for_prompt), system)
    c.fail("type", f"unknown sample type {kind!r} (expected one of {', '.join(SAMPLE_TYPES)})")


def _rounds(c: _Checker, obj: dict, *, allow_api: bool, for_prompt: bool) -> tuple[Turn, ...]:
    rounds = c.get(obj, "rounds", "rounds", list)
    if not rounds:
        c.fail("rounds", "empty")
    roles = ("ask", "ans", "ans-api") if allow_api else ("ask", "ans")
    turns: list[Turn] = []
    for i, item in enumerate(rounds):
        field = f"rounds[{i}]"
        if not isinstance(item, list) or len(item) != 2:
            c.fail(field, "expected a [role, content] pair")
        role, content = item
        if role not in roles:
            c.fail(f"{field}[0]", f"unknown role {role!r} (expected one of {', '.join(roles)})")
        if role == "ask":
            text = _turn_text(c, content, field)
            if turns and isinstance(turns[-1], Ask):  # gdGPT's example has consecutive asks: one user turn
                turns[-1] = Ask(turns[-1].text + "\n" + text, turns[-1].asks + (text,))
            else:
                turns.append(Ask(text))
            continue
        if not turns or not isinstance(turns[-1], Ask):
            c.fail(f"{field}[0]", f"'{role}' must follow an 'ask'")
        turns.append(Answer(_turn_text(c, content, field)) if role == "ans" else _api_answer(c, content, field))
    last_is_ask = isinstance(turns[-1], Ask)
    if last_is_ask != for_prompt:
        c.fail(f"rounds[{len(rounds) - 1}]", "a generation prompt must end with an 'ask'" if for_prompt
               else "conversation must end with an answer")
    return tuple(turns)


def _turn_text(c: _Checker, content, field: str) -> str:
    if not isinstance(content, str):
        c.fail(f"{field}[1]", f"expected string, got {type(content).__name__}")
    if not content.strip():
        c.fail(f"{field}[1]", "empty")
    return content


def _api_answer(c: _Checker, content, field: str) -> ApiAnswer:
    if not isinstance(content, dict):
        c.fail(f"{field}[1]", f"expected object with 'actions' and 'ans', got {type(content).__name__}")
    actions = c.get(content, "actions", f"{field}.actions", list)
    if not actions:
        c.fail(f"{field}.actions", "empty")
    parsed = []
    for j, action in enumerate(actions):
        af = f"{field}.actions[{j}]"
        if not isinstance(action, dict):
            c.fail(af, f"expected object, got {type(action).__name__}")
        parsed.append(ApiAction(inner_thought=c.text(action, "inner_thought", f"{af}.inner_thought", required=False),
                                api_name=c.text(action, "api_name", f"{af}.api_name", non_empty=True),
                                api_param=c.json_text(action, "api_param", f"{af}.api_param"),
                                api_res=c.json_text(action, "api_res", f"{af}.api_res"),
                                api_res_json="api_res" in action and not isinstance(action["api_res"], str)))
    return ApiAnswer(tuple(parsed), c.text(content, "ans", f"{field}.ans", non_empty=True))
