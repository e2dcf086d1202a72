"""Prompt text for every sample type, in one place (training and demo.py render through here).

A rendered sample is a list of Segments: text pieces marked target (the model's own output,
which carries loss) or context. BOS/EOS are not text: data.tokenize adds them.

template="default" (documented layouts; `{...}` are sample fields):

  pretrain        {text}                                                     all target
  instruct        Alpaca: "Below is an instruction that describes a task[, paired with an input
                  that provides further context]. Write a response that appropriately completes
                  the request.\n\n### Instruction:\n{instruct}\n\n[### Input:\n{input}\n\n]### Response:\n"
                  then {output} (target)
  conversation    per ask:  "### User:\n{ask}\n\n### Assistant:\n"
                  per ans:  {ans} (target), then "\n\n" before the next turn
  ref_qa          "### Reference:\n{reference}\n\n" then the conversation layout
  conver_has_api  "### API:\n{api_desc}\n\n" then the conversation layout, where an ans-api is
                  per action: "Thought: {inner_thought}\nAction: {api_name}\nAction Input: {api_param}\nObservation:"
                  (target: the model decides to call, then stops for the tool) + " {api_res}\n" (context:
                  the tool wrote it), and finally "Final Answer: {ans}" (target)

template="chat_template": the tokenizer's own chat_template renders the messages: an optional
"system" field is the system message (prepended to the first user message when the template has
no system role); instruct is one user message "{instruct}\n\n{input}"; reference and api
description are put before the first user message's text; an ans-api becomes, per action, an
assistant message "Thought/Action/Action Input" (target) and a tool message with the api result
(context), then the assistant's "Final Answer: {ans}" (a template without a tool role gets the
default layout's action/result text inside one assistant message, results as context).
Target is exactly each assistant message's content plus the template's end-of-turn token (the
first special token the template writes after it, e.g. <|im_end|>, <|eot_id|>); the turn
boundaries come from rendering the conversation incrementally (up to a generation prompt, then
with the answer), never from searching the text. Pretrain ignores the chat template.

template="auto" (the training and demo default): chat_template when the tokenizer has one, else
default.

template="gdgpt": gdGPT's own layout, piece by piece (data/gdgpt_template.py).
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import NamedTuple

from . import gdgpt_template as gdgpt
from .samples import (Answer, ApiAnswer, Ask, Conversation, ConverHasApi, Instruct, Pretrain, RefQA, Sample, Turn,
                      parse_sample)

TEMPLATES = ("auto", "default", "chat_template", "gdgpt")


class TemplateError(ValueError):
    """A template choice the tokenizer cannot serve (a user error: reported on one line)."""


def resolve_template(template: str, tokenizer=None) -> str:
    """The template a run uses: 'auto' is 'chat_template' when the tokenizer has a chat template,
    else 'default'; an unknown name, or 'chat_template' without one, is a TemplateError."""
    if template not in TEMPLATES:
        raise TemplateError(f"unknown prompt_template {template!r} (expected one of {', '.join(TEMPLATES)})")
    has_chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        return "chat_template" if has_chat else "default"
    if template == "chat_template" and not has_chat:
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise TemplateError(f"prompt_template 'chat_template': {name} has no chat_template "
                            "(use 'auto' or 'default')")
    return template


def uses_chat_template(sample: Sample, template: str) -> bool:
    """Whether `sample` is rendered by the tokenizer's chat template (resolved `template`)."""
    return template == "chat_template" and not isinstance(sample, Pretrain)


class Segment(NamedTuple):
    text: str
    target: bool


ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruct}\n\n### Response:\n")
USER_TURN = "### User:\n{text}\n\n### Assistant:\n"
TURN_SEPARATOR = "\n\n"
REFERENCE_BLOCK = "### Reference:\n{reference}\n\n"
API_BLOCK = "### API:\n{api_desc}\n\n"
ACTION_CALL = "Thought: {inner_thought}\nAction: {api_name}\nAction Input: {api_param}\nObservation:"
ACTION_RESULT = " {api_res}\n"
FINAL_ANSWER = "Final Answer: {ans}"
SYSTEM_BLOCK = "### System:\n{system}\n\n"  # only when a sample has a system prompt
# chat_template mode: context blocks placed before the first user message's text
CHAT_REFERENCE = "Reference:\n{reference}\n\n"
CHAT_API = "API:\n{api_desc}\n\n"


def render(sample: Sample, template: str = "default", tokenizer=None) -> list[Segment]:
    """Segments of a training sample (or of a generation prompt: then all are context)."""
    template = resolve_template(template, tokenizer)
    if template == "gdgpt":  # one Segment per piece gdGPT tokenized on its own
        return [Segment(text, target) for text, target in gdgpt.pieces(sample, gdgpt_eos(tokenizer))]
    if uses_chat_template(sample, template):
        return _render_chat(sample, tokenizer)
    return _render_default(sample)


def gdgpt_eos(tokenizer) -> str:
    if tokenizer is None or not tokenizer.eos_token:
        raise TemplateError("prompt_template 'gdgpt' needs a tokenizer with an eos_token (its layout writes it)")
    return tokenizer.eos_token


def render_prompt(sample, template: str = "default", tokenizer=None,
                  pending: list[tuple[str, str]] = ()) -> str:
    """Text up to where the model's answer starts, for generation.

    `sample` is a record or its JSON dict in prompt form: instruct without "output", rounds
    ending with an "ask" (e.g. {"type": "conversation", "rounds": [["ask", "Hi"]]}).
    pending: api calls the model already made in this answer, as (the call text it generated,
    the tool's result): the prompt then continues after the last result, laid out as training
    lays out an ans-api turn.
    """
    template = resolve_template(template, tokenizer)
    if isinstance(sample, dict):
        sample = parse_sample(sample, "<prompt>", 0, for_prompt=True)
    if template == "gdgpt":
        return "".join(text for text, _ in gdgpt.prompt_pieces(sample, gdgpt_eos(tokenizer), pending))
    if not uses_chat_template(sample, template):
        text = "".join(seg.text for seg in _render_default(sample))
        return text + "".join(call + ACTION_RESULT.format(api_res=res) for call, res in pending)
    style = chat_style(tokenizer)
    messages, _ = chat_messages(sample, style)
    if pending and not style.tool:  # the results sit inside the assistant message, which the model continues
        partial = "".join(call + ACTION_RESULT.format(api_res=res) for call, res in pending)
        return _apply_chat(tokenizer, messages + [{"role": "assistant", "content": partial}], continue_final=True)
    for call, res in pending:
        messages += [{"role": "assistant", "content": _strip_observation(call)}, {"role": "tool", "content": res}]
    return _apply_chat(tokenizer, messages, generation_prompt=True)


# ----------------------------------------------------------------------------- default layouts
def _render_default(sample: Sample) -> list[Segment]:
    if isinstance(sample, Pretrain):
        return [Segment(sample.text, True)]
    if sample.system:
        return [Segment(SYSTEM_BLOCK.format(system=sample.system), False)] + _render_default_body(sample)
    return _render_default_body(sample)


def _render_default_body(sample: Sample) -> list[Segment]:
    if isinstance(sample, Instruct):
        fmt = ALPACA_WITH_INPUT if sample.input else ALPACA_NO_INPUT
        segs = [Segment(fmt.format(instruct=sample.instruct, input=sample.input), False)]
        return segs + [Segment(sample.output, True)] if sample.output else segs
    if isinstance(sample, RefQA):
        return [Segment(REFERENCE_BLOCK.format(reference=sample.reference), False)] + _turns(sample.rounds)
    if isinstance(sample, ConverHasApi):
        return [Segment(API_BLOCK.format(api_desc=sample.api_desc), False)] + _turns(sample.rounds)
    if isinstance(sample, Conversation):
        return _turns(sample.rounds)
    raise TypeError(f"not a sample record: {type(sample).__name__}")


def _turns(rounds: tuple[Turn, ...]) -> list[Segment]:
    segs: list[Segment] = []
    for i, turn in enumerate(rounds):
        if isinstance(turn, Ask):
            segs.append(Segment(USER_TURN.format(text=turn.text), False))
            continue
        segs.extend(answer_segments(turn))
        if i + 1 < len(rounds):
            segs.append(Segment(TURN_SEPARATOR, False))
    return segs


def answer_segments(turn: Answer | ApiAnswer) -> list[Segment]:
    """An assistant turn's content: plain answer, or api calls (target) with their results (context)."""
    if isinstance(turn, Answer):
        return [Segment(turn.text, True)]
    segs = []
    for a in turn.actions:
        segs.append(Segment(ACTION_CALL.format(inner_thought=a.inner_thought, api_name=a.api_name,
                                               api_param=a.api_param), True))
        segs.append(Segment(ACTION_RESULT.format(api_res=a.api_res), False))
    segs.append(Segment(FINAL_ANSWER.format(ans=turn.ans), True))
    return segs


# ----------------------------------------------------------------------------- api calls in generated text
ACTION_CALL_CHAT = "Thought: {inner_thought}\nAction: {api_name}\nAction Input: {api_param}"  # a message of its own
_CALL = re.compile(r"(?:Thought: ?(?P<thought>.*?)\n)?Action: ?(?P<name>[^\n]*)(?:\nAction Input: ?(?P<param>.*?))?"
                   r"(?:\nObservation:)?\s*$", re.S)


def parse_api_call(text: str) -> dict | None:
    """{inner_thought, api_name, api_param} of an api call the model generated (the layout of
    ACTION_CALL, with or without the final "Observation:", or gdGPT's), or None when `text` is no call."""
    if "#### api call" in text:
        return gdgpt.parse_call(text)
    m = _CALL.search(text)
    if m is None or "Final Answer:" in text:
        return None
    return {"inner_thought": (m["thought"] or "").strip(), "api_name": m["name"].strip(),
            "api_param": (m["param"] or "").strip()}


def _strip_observation(call: str) -> str:
    call = call.rstrip()
    return call[:-len("Observation:")].rstrip() if call.endswith("Observation:") else call


# ----------------------------------------------------------------------------- tokenizer chat template
@dataclass(frozen=True)
class ChatStyle:
    """What a tokenizer's chat template does, found by rendering probe conversations.

    system / tool: it renders a system / tool message (one that raises or drops the text has not).
    closing: the text it writes after an assistant message's content ("<|im_end|>\\n");
    end_of_turn: the part of `closing` up to and including its first special token (what the
    model learns to emit to stop: "<|im_end|>"); eot_token: that special token ("" when the
    closing has none: then the whole closing is target and EOS ends the sample).
    """

    system: bool
    tool: bool
    closing: str | None
    end_of_turn: str
    eot_token: str


_PROBE = "Qx7pProbe"
_styles: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_style(tokenizer) -> ChatStyle:
    template = getattr(tokenizer, "chat_template", None)
    cached = _styles.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    style = _probe_style(tokenizer)
    _styles[tokenizer] = (template, style)
    return style


def _probe_style(tokenizer) -> ChatStyle:
    import jinja2

    def renders(messages, marker, generation_prompt=False) -> bool:
        try:  # a template that does not know a role usually raises (raise_exception)
            return marker in _apply_chat(tokenizer, messages, generation_prompt=generation_prompt)
        except jinja2.TemplateError:
            return False

    user = {"role": "user", "content": "Hi"}
    answer = {"role": "assistant", "content": _PROBE + "A"}
    system = renders([{"role": "system", "content": _PROBE + "S"}, user], _PROBE + "S", True)
    tool = renders([user, answer, {"role": "tool", "content": _PROBE + "T"}], _PROBE + "T", True)
    prompt = _apply_chat(tokenizer, [user], generation_prompt=True)
    full = _apply_chat(tokenizer, [user, answer], generation_prompt=False)
    turn = full[len(prompt):] if full.startswith(prompt) else ""
    closing = turn.split(_PROBE + "A", 1)[1] if _PROBE + "A" in turn else None  # None: not prefix-stable
    end_of_turn, eot_token = "", ""
    if closing:
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                     if getattr(t, "special", False)}
        found = [(closing.find(t), t) for t in specials if t and t in closing]
        if found:
            at, eot_token = min(found, key=lambda f: (f[0], -len(f[1])))
            end_of_turn = closing[:at + len(eot_token)]
    return ChatStyle(system, tool, closing, end_of_turn, eot_token)


def chat_messages(sample: Sample, style: ChatStyle | None = None) -> tuple[list[dict], list[list[Segment] | None]]:
    """The sample's chat messages, and per message the assistant content's segments (None for
    system, user and tool messages). `style` None: no system or tool role assumed."""
    style = style or ChatStyle(False, False, None, "", "")
    if isinstance(sample, Instruct):
        user = sample.instruct + (f"\n\n{sample.input}" if sample.input else "")
        rounds: tuple[Turn, ...] = (Ask(user),) + ((Answer(sample.output),) if sample.output else ())
        preamble = ""
    else:
        rounds = sample.rounds
        preamble = (CHAT_REFERENCE.format(reference=sample.reference) if isinstance(sample, RefQA) else
                    CHAT_API.format(api_desc=sample.api_desc) if isinstance(sample, ConverHasApi) else "")
    messages, contents = [], []
    if sample.system and style.system:
        messages.append({"role": "system", "content": sample.system})
        contents.append(None)
    elif sample.system:
        preamble = f"{sample.system}\n\n{preamble}"

    def add(role: str, segs: list[Segment] | None, text: str | None = None):
        messages.append({"role": role, "content": text if segs is None else "".join(s.text for s in segs)})
        contents.append(segs)

    for i, turn in enumerate(rounds):
        if isinstance(turn, Ask):
            add("user", None, (preamble if i == 0 else "") + turn.text)
        elif isinstance(turn, ApiAnswer) and style.tool:
            for a in turn.actions:
                add("assistant", [Segment(ACTION_CALL_CHAT.format(inner_thought=a.inner_thought, api_name=a.api_name,
                                                                  api_param=a.api_param), True)])
                add("tool", None, a.api_res)
            add("assistant", [Segment(FINAL_ANSWER.format(ans=turn.ans), True)])
        else:
            add("assistant", answer_segments(turn))
    return messages, contents


def _apply_chat(tokenizer, messages: list[dict], generation_prompt: bool = False, continue_final: bool = False) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat_template' needs a tokenizer that has a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         continue_final_message=continue_final)


def _render_chat(sample: Sample, tokenizer) -> list[Segment]:
    """Render with the chat template; each assistant message's part is the text the template adds
    for it: the conversation is rendered up to a generation prompt and then with the answer, and
    the difference is that turn (requires a prefix-stable template, as chat templates for
    training are). Its target: the content and the end-of-turn token; the rest of the template's
    closing (a newline after <|im_end|>) is context."""
    style = chat_style(tokenizer)
    messages, contents = chat_messages(sample, style)
    segs: list[Segment] = []
    done = ""
    for i, content in enumerate(contents):
        if content is None:
            continue
        prompt = _apply_chat(tokenizer, messages[:i], generation_prompt=True)
        full = _apply_chat(tokenizer, messages[:i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise TemplateError("the tokenizer's chat_template is not prefix-stable (an earlier turn renders "
                                "differently once later turns follow); use prompt_template 'default'")
        segs.append(Segment(prompt[len(done):], False))
        segs.extend(_assistant_turn(full[len(prompt):], content, style))
        done = full
    whole = _apply_chat(tokenizer, messages, generation_prompt=False)
    if not whole.startswith(done):
        raise TemplateError("the tokenizer's chat_template is not prefix-stable; use prompt_template 'default'")
    segs.append(Segment(whole[len(done):], False))
    return [s for s in segs if s.text]


def _assistant_turn(turn: str, content: list[Segment], style: ChatStyle) -> list[Segment]:
    """An assistant turn's text (content + closing) as segments: the content (api results inside
    it excepted) and the end-of-turn token are target, the rest of the closing context."""
    closing = style.closing or ""
    if not closing or not turn.endswith(closing) or not style.eot_token:
        return _mark_context(turn, content)  # no recognisable end-of-turn token: everything the template adds is target
    body = turn[:len(turn) - len(closing)]
    return _mark_context(body, content) + [Segment(style.end_of_turn, True),
                                           Segment(closing[len(style.end_of_turn):], False)]


def _mark_context(assistant_text: str, content: list[Segment]) -> list[Segment]:
    """The assistant text as target, except the context pieces of its content (api results)."""
    out, cursor = [], 0
    for piece in content:
        if piece.target:
            continue
        at = assistant_text.find(piece.text, cursor)
        if at < 0:
            continue
        out += [Segment(assistant_text[cursor:at], True), Segment(piece.text, False)]
        cursor = at + len(piece.text)
    out.append(Segment(assistant_text[cursor:], True))
    return [s for s in out if s.text]
