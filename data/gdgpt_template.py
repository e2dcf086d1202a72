"""gdGPT's prompt layout (`prompt_template: gdgpt`), so a model tuned with gdGPT is trained on and
served with exactly the text it knows (github.com/CoinCheung/gdGPT, datasets.py).

gdGPT tokenizes each piece below separately (`tokenizer(piece, add_special_tokens=False)`,
special tokens parsed: "</s>" in a piece is EOS) and concatenates the ids, with no BOS; a
sentencepiece tokenizer gives other ids for a piece alone than inside a longer text, so the
pieces are kept apart here and data.tokenize tokenizes them one by one. `{eos}` is the
tokenizer's eos_token text. Pieces marked * carry loss.

  pretrain        *{text}
  instruct        "Below is an instruction that describes a task, paired with an input that provides
                  further context. Write a response that appropriately completes the request.\\n\\n
                  ### Instruction:\\n{instruct}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n"
                  *"{output}\\n{eos}"
  conversation    "A chat between a curious human and an artificial intelligence assistant. The
                  assistant gives helpful, detailed, and polite answers to the human's questions. \\n\\n"
                  then the rounds, roles Human / Assistent (sic):
                    ask      "### Human: {ask} \\n"               (each of consecutive asks on its own)
                    ans      "### Assistent: "  *"{ans} {eos}\\n"
                    ans-api  per action: "### Assistent: "  *"{inner_thought}\\n#### api call\\n```python\\n
                             {api_name}(k=v, ...)\\n```  {eos}"  "\\n#### api output\\n{api_res}\\n";
                             then "### Assistent: "  *"{ans}  {eos}"
  ref_qa          "Generate responses to the given instruction series according to the reference
                  text. \\n\\n### Reference: \\n{reference}\\n\\n" then the rounds, roles Instruction / Response
  conver_has_api  "Answer the following questions as best as you can. You have access to the following
                  tool(s):\\n" + json.dumps(api_desc) then the rounds, roles Human / Assistent

An api call is printed as Python (`search(query='x', version='KJV')`: api_param's object as keyword
arguments, values as Python literals); a non-string api_res as indented JSON. Where gdGPT's
behaviour was a bug it is not copied: gdGPT appended one more EOS after every non-pretrain sample
(instruct ended "\\n</s></s>") and none after pretrain text; here EOS closes every sample once (the
pieces' own EOS, or one appended to pretrain). An api_param given as a JSON string (the form of
gdGPT's README example, which its code could not print) is read as the object it spells.
"""
from __future__ import annotations

import ast
import json
import re

from .samples import Answer, ApiAction, ApiAnswer, Ask, ConverHasApi, Instruct, Pretrain, RefQA, Sample

INSTRUCT_HEADER = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n")
CHAT_HEADER = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions. \n\n")
REF_HEADER = "Generate responses to the given instruction series according to the reference text. \n\n### Reference: \n"
API_HEADER = "Answer the following questions as best as you can. You have access to the following tool(s):\n"
CALL = "{thought}\n#### api call\n```python\n{call}\n```  "
API_OUTPUT = "\n#### api output\n{res}\n"

Piece = tuple[str, bool]  # (text tokenized on its own, carries loss)


def pieces(sample: Sample, eos: str) -> list[Piece]:
    """A training sample as gdGPT's pieces."""
    if isinstance(sample, Pretrain):
        return [(sample.text, True)]
    head = _system(sample)
    if isinstance(sample, Instruct):
        return head + [(_instruct_prompt(sample), False), (f"{sample.output}\n{eos}", True)]
    roles, header = _header(sample)
    return head + header + _rounds(sample.rounds, roles, eos)


def prompt_pieces(sample: Sample, eos: str, pending: list[tuple[str, str]] = ()) -> list[Piece]:
    """A generation prompt as gdGPT's pieces, ending where the model's answer starts; `pending`:
    api calls (text the model generated, before its EOS) and results earlier in this answer."""
    if isinstance(sample, Pretrain):
        return [(sample.text, False)]
    head = _system(sample)
    if isinstance(sample, Instruct):
        return head + [(_instruct_prompt(sample), False)]
    roles, header = _header(sample)
    out = head + header + _rounds(sample.rounds, roles, eos) + [(f"### {roles[1]}: ", False)]
    for call, res in pending:
        out += [(call + eos, False), (API_OUTPUT.format(res=res), False), (f"### {roles[1]}: ", False)]
    return [(text, False) for text, _ in out]


def _system(sample: Sample) -> list[Piece]:
    # gdGPT had no system prompt; one given in the data comes first, alone
    return [(f"{sample.system}\n\n", False)] if getattr(sample, "system", "") else []


def _instruct_prompt(sample: Instruct) -> str:
    given = f"### Input:\n{sample.input}\n\n" if sample.input.strip() else ""
    return f"{INSTRUCT_HEADER}### Instruction:\n{sample.instruct}\n\n{given}### Response:\n"


def _header(sample: Sample) -> tuple[tuple[str, str], list[Piece]]:
    if isinstance(sample, RefQA):
        return ("Instruction", "Response"), [(f"{REF_HEADER}{sample.reference}\n\n", False)]
    if isinstance(sample, ConverHasApi):
        return ("Human", "Assistent"), [(API_HEADER + json.dumps(sample.api_desc, indent=2, ensure_ascii=False), False)]
    return ("Human", "Assistent"), [(CHAT_HEADER, False)]


def _rounds(rounds, roles: tuple[str, str], eos: str) -> list[Piece]:
    out: list[Piece] = []
    prefix = (f"### {roles[1]}: ", False)
    for turn in rounds:
        if isinstance(turn, Ask):
            out += [(f"### {roles[0]}: {text} \n", False) for text in turn.asks]
        elif isinstance(turn, Answer):
            out += [prefix, (f"{turn.text} {eos}\n", True)]
        elif isinstance(turn, ApiAnswer):
            for a in turn.actions:
                out += [prefix, (call_text(a) + eos, True), (API_OUTPUT.format(res=api_output(a)), False)]
            out += [prefix, (f"{turn.ans}  {eos}", True)]
    return out


def call_text(a: ApiAction) -> str:
    return CALL.format(thought=a.inner_thought, call=format_call(a.api_name, a.api_param))


def format_call(name: str, api_param: str) -> str:
    """`name(key=value, ...)` with Python literals, as gdGPT printed its ast.Call (astunparse: repr)."""
    try:
        params = json.loads(api_param)
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict):
        return f"{name}({api_param})"  # not an object of keyword arguments: shown as given
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def api_output(a: ApiAction) -> str:
    return json.dumps(json.loads(a.api_res), indent=2, ensure_ascii=False) if a.api_res_json else a.api_res


_CALL_RE = re.compile(r"^(?P<thought>.*?)\n#### api call\n```python\n(?P<call>.*?)\n```\s*$", re.S)


def parse_call(text: str) -> dict | None:
    """{inner_thought, api_name, api_param (JSON text)} of a call the model wrote in gdGPT's
    layout, or None when `text` is not one."""
    m = _CALL_RE.match(text.strip("\n"))
    if m is None:
        return None
    try:
        node = ast.parse(m["call"].strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        params = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        return {"inner_thought": m["thought"], "api_name": node.func.id,
                "api_param": json.dumps(params, ensure_ascii=False)}
    except (SyntaxError, ValueError, TypeError):
        return None
