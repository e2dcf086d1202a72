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

template="chat_template": the tokenizer's own chat_template renders user/assistant messages
(instruct = one user message "{instruct}\n\n{input}"; reference and api description are put
before the first user message's text; an ans-api's content is the action/result text above).
Everything the template adds to an assistant turn (e.g. an end-of-turn token) is target,
except api results. Pretrain ignores the chat template.
"""
from __future__ import annotations

from typing import NamedTuple

from .samples import (Answer, ApiAnswer, Ask, Conversation, ConverHasApi, Instruct, Pretrain, RefQA, Sample, Turn,
                      parse_sample)

TEMPLATES = ("default", "chat_template")


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
# chat_template mode: context blocks placed before the first user message's text
CHAT_REFERENCE = "Reference:\n{reference}\n\n"
CHAT_API = "API:\n{api_desc}\n\n"


def render(sample: Sample, template: str = "default", tokenizer=None) -> list[Segment]:
    """Segments of a training sample (or of a generation prompt: then all are context)."""
    if template == "default" or isinstance(sample, Pretrain):
        return _render_default(sample)
    if template == "chat_template":
        return _render_chat(sample, tokenizer)
    raise ValueError(f"unknown template {template!r} (expected one of {', '.join(TEMPLATES)})")


def render_prompt(sample, template: str = "default", tokenizer=None) -> str:
    """Text up to where the model's answer starts, for generation.

    `sample` is a record or its JSON dict in prompt form: instruct without "output", rounds
    ending with an "ask" (e.g. {"type": "conversation", "rounds": [["ask", "Hi"]]}).
    """
    if isinstance(sample, dict):
        sample = parse_sample(sample, "<prompt>", 0, for_prompt=True)
    if template == "chat_template" and not isinstance(sample, Pretrain):
        messages, _ = chat_messages(sample)
        return _apply_chat(tokenizer, messages, generation_prompt=True)
    return "".join(seg.text for seg in render(sample, template, tokenizer))


# ----------------------------------------------------------------------------- default layouts
def _render_default(sample: Sample) -> list[Segment]:
    if isinstance(sample, Pretrain):
        return [Segment(sample.text, True)]
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


# ----------------------------------------------------------------------------- tokenizer chat template
def chat_messages(sample: Sample) -> tuple[list[dict], list[list[Segment] | None]]:
    """user/assistant messages of a sample, and per message the assistant content's segments."""
    if isinstance(sample, Instruct):
        user = sample.instruct + (f"\n\n{sample.input}" if sample.input else "")
        rounds: tuple[Turn, ...] = (Ask(user),) + ((Answer(sample.output),) if sample.output else ())
        preamble = ""
    else:
        rounds = sample.rounds
        preamble = (CHAT_REFERENCE.format(reference=sample.reference) if isinstance(sample, RefQA) else
                    CHAT_API.format(api_desc=sample.api_desc) if isinstance(sample, ConverHasApi) else "")
    messages, contents = [], []
    for i, turn in enumerate(rounds):
        if isinstance(turn, Ask):
            messages.append({"role": "user", "content": (preamble if i == 0 else "") + turn.text})
            contents.append(None)
        else:
            segs = answer_segments(turn)
            messages.append({"role": "assistant", "content": "".join(s.text for s in segs)})
            contents.append(segs)
    return messages, contents


def _apply_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat_template' needs a tokenizer that has a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _render_chat(sample: Sample, tokenizer) -> list[Segment]:
    """Render with the chat template; each assistant turn is the text the template adds for it.

    The assistant part is found by rendering the conversation up to a generation prompt and
    then with the answer: the difference is the target (requires a prefix-stable template, as
    chat templates for training are).
    """
    messages, contents = chat_messages(sample)
    segs: list[Segment] = []
    done = ""
    for i, content in enumerate(contents):
        if content is None:
            continue
        prompt = _apply_chat(tokenizer, messages[:i], generation_prompt=True)
        full = _apply_chat(tokenizer, messages[:i + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat_template is not prefix-stable; use template='default'")
        segs.append(Segment(prompt[len(done):], False))
        segs.extend(_mark_context(full[len(prompt):], content))
        done = full
    rest = _apply_chat(tokenizer, messages, generation_prompt=False)[len(done):]
    return segs + [Segment(rest, False)] if rest else segs


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
