"""`--help-config` lists exactly the keys the config accepts, each with a description.

The expected set comes from the schema (engine/config.py's dataclass fields, nested sections
walked, plus OWNED_DS_KEYS, our keys inside DeepSpeed's sections), so a key added later is held
to this without editing the test; a field declared without `doc(...)` text fails here.
"""
import dataclasses
import re
import typing

import pytest

from engine import config as C
from engine.cli import config_parser, parse_config

KEY_LINE = re.compile(r"^([\w.]+): (.+) = (.+)$")


def listed(text: str) -> dict[str, str]:
    """{key: description} of help_text's output (a key line, then its text indented by 4)."""
    lines, out = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = KEY_LINE.match(line)
        if m:
            assert m[1] not in out, f"--help-config lists {m[1]} twice"
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            out[m[1]] = nxt[4:].strip() if nxt.startswith("    ") else ""
    return out


def schema_keys() -> set[str]:
    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("ds", "source"):  # DeepSpeed's own keys (listed by name) and the loader's note
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name
    return set(walk(C.TrainConfig)) | set(C.OWNED_DS_KEYS)


@pytest.fixture(scope="module")
def help_output():
    """What `train_ds.py --help-config` prints (engine/cli.py's parser, in process)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        parse_config(config_parser("test"), ["--help-config"])
    assert e.value.code == 0
    return buf.getvalue()


def test_help_lists_every_schema_key_with_text(help_output):
    keys = listed(help_output)
    assert set(keys) == schema_keys(), (f"missing from --help-config: {sorted(schema_keys() - set(keys))}; "
                                        f"listed but not in the schema: {sorted(set(keys) - schema_keys())}")
    blank = [k for k, text in keys.items() if len(text) < 10]
    assert not blank, f"config keys without help text (declare them with engine.config.doc): {blank}"
    assert "optimizer.no_wd_kws" in keys and len(keys) > 40
    ds_line = next(line for line in help_output.splitlines() if line.startswith("DeepSpeed keys passed through: "))
    assert set(ds_line.split(": ", 1)[1].split(", ")) == C.DEEPSPEED_KEYS


def test_every_key_is_accepted_at_its_default():
    """Each key (the set the test above equates with --help-config's) loads at its default, alone
    beside the required ones: no 'unknown key', no type error. Our keys inside DeepSpeed's sections
    load inside their section."""
    required = {"model_path": "m", "data_path": ["d.jsonl"], "save_path": "s", "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1}
    cases = {key: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for key, _, f in C.owned_fields()
             if key not in required and (f.default, f.default_factory) != (dataclasses.MISSING,) * 2}
    cases.update({"optimizer.no_wd_kws": ["bias", "norm"]})
    assert set(cases) | set(required) >= schema_keys() - {"model_path", "data_path", "save_path"}
    for key, value in cases.items():
        raw = dict(required, optimizer={"type": "AdamW", "params": {"lr": 1e-4}})
        node = raw
        *parents, last = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
        C.from_dict(raw, "x.yml")  # raises ConfigError on an unknown key or a wrong type


def test_a_field_without_doc_text_is_caught():
    """The check above would fail for a schema field declared without text."""
    @dataclasses.dataclass
    class Probe:
        documented: int = C.doc("has text", default=0)
        bare: int = 0

    text = "\n".join(f"{k}: int = 0\n    {f.metadata.get('doc', '')}"
                     for k, _, f in C.owned_fields(Probe))
    assert listed(text) == {"documented": "has text", "bare": ""}
