"""Every command in README.md's ```bash blocks, run as far as a CPU can (issue 34, item 5).

Commands are taken from the README mechanically (continuations joined, comments dropped), so a
command added there is covered without editing this file:
- a training command (`train_ds.py` / `train_ds_zero.py`, under `deepspeed` or `python`) runs as a
  `--dry-run` at the world size it names (`--world-size`, the launcher's `--num_gpus` x `--num_nodes`,
  else its config's dims), in process, with `model_path` / `data_path` / `save_path` pointed at a
  config.json-only dir of the model its config is written for, examples/data and a temp dir: the
  whole config is validated and planned, which is what fails when a command or config goes stale;
- any other command of one of our scripts (`convert_model.py`, `demo.py`, `examples/*.py`,
  `bench/*.py`) has its argument list parsed by that script's own parser (its `main(argv)`,
  stopped right after `parse_args`; a `@file` argument is given a file): its paths are
  placeholders (`M`, `/path/to/hf-model`) or need a GPU, the network or a trained run; what they
  do is tested by the test file of each script;
- SKIP lists the rest, each with its reason.
"""
import argparse
import importlib
import importlib.util
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DATA = ROOT / "examples" / "data" / "instruct.jsonl"

# Commands not run, by how they start: (prefix, why)
SKIP = [
    ("python3 -m venv", "the set-up command: .ci/run runs README's two marked set-up commands as written"),
    (". .venv/bin/activate && python -m pytest", "the test suite itself (.ci/run)"),
    (". .venv/bin/activate", "shell state: activates the venv this test already runs in"),
    ("hf download", "network: the HF hub"),
    ("pip ", "network: the package index"),
]
TRAIN_SCRIPTS = ("train_ds.py", "train_ds_zero.py")
# The model each config's dry run is planned for (its model_path is the user's; --dry-run reads
# only config.json). tiny_<family>_* configs get that family's tiny_hf_config().
SHAPES = {
    "llama-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=4096),
    "bloom-7b1": dict(model_type="bloom", vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32,
                      layer_norm_epsilon=1e-5),
}
CONFIG_MODEL = {"llama_7b_pp.yml": "llama-7b", "ds_config_zero.yml": "llama-7b", "ds_config_pp.yml": "bloom-7b1"}
# "your gdGPT file": README's stand-in for the user's own gdGPT config; gdGPT's newest is run in its place
# (tests/test_gdgpt.py runs every version of it)
STANDINS = {"configs/ds_config_pp.yml": sorted((ROOT / "tests" / "data" / "gdgpt").glob("ds_config_pp@*"))[-1]}


def readme_commands(text: str) -> list[str]:
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(shlex.split(line, comments=True, posix=False))  # trailing `# ...` dropped, quotes kept
            if line:
                out.append(line)
    return out


COMMANDS = readme_commands(README.read_text())


def skip_reason(cmd: str) -> str | None:
    return next((why for prefix, why in SKIP if cmd.startswith(prefix)), None)


def split(cmd: str) -> tuple[str, list[str], int | None]:
    """(script, its argv, world size the launcher gives or None) of `[VAR=x ...] (python|deepspeed [opts]) script args`;
    README's `[--opt value]` (optional) is run with the option."""
    words = [w for w in shlex.split(cmd.replace("[", "").replace("]", "")) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    launcher, i = words[0], next(i for i, w in enumerate(words) if w.endswith(".py"))
    assert launcher in ("python", "python3", "deepspeed"), f"README command with an unknown launcher: {cmd}"
    world = None
    if launcher == "deepspeed":
        opts = argparse.ArgumentParser(add_help=False)
        opts.add_argument("--num_gpus", type=int, default=None)
        opts.add_argument("--num_nodes", type=int, default=1)
        known, _ = opts.parse_known_args(words[1:i])
        world = known.num_gpus and known.num_gpus * known.num_nodes
    return words[i], words[i + 1:], world


def load_main(script: str):
    path = ROOT / script
    assert path.is_file(), f"README runs {script}, which does not exist"
    if path.parent == ROOT:
        return importlib.import_module(path.stem).main
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class Parsed(BaseException):
    """Raised right after a script's parser accepted its argv: nothing of the command runs."""


def test_readme_has_commands_and_every_one_is_classified():
    assert len(COMMANDS) > 25 and sum(c.split()[0] == "deepspeed" for c in COMMANDS) >= 5
    used = {next((prefix for prefix, _ in SKIP if c.startswith(prefix)), None) for c in COMMANDS}
    unused = [prefix for prefix, _ in SKIP if prefix not in used]
    assert not unused, f"SKIP entries no README command needs any more: {unused}"
    for cmd in COMMANDS:
        if skip_reason(cmd) is None:
            script, _, _ = split(cmd)  # a command this file cannot run fails here, naming it
            assert (ROOT / script).is_file(), cmd


@pytest.fixture(scope="module")
def shape_dirs(tmp_path_factory):
    from models import FAMILIES, get_family

    root = tmp_path_factory.mktemp("shapes")
    shapes = {**SHAPES, **{f"tiny-{name}": get_family(name).tiny_hf_config() for name in FAMILIES}}
    for name, hf in shapes.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(hf))
    return root


def model_for(config: str) -> str:
    name = Path(config).name
    tiny = re.match(r"tiny_([a-z0-9]+)_", name)
    assert tiny or name in CONFIG_MODEL, f"README trains with {config}: add the model it is written for to CONFIG_MODEL"
    return f"tiny-{tiny[1]}" if tiny else CONFIG_MODEL[name]


TRAIN = [c for c in COMMANDS if skip_reason(c) is None and Path(split(c)[0]).name in TRAIN_SCRIPTS]
OTHER = [c for c in COMMANDS if skip_reason(c) is None and c not in TRAIN]


@pytest.mark.parametrize("cmd", TRAIN)
def test_training_command_dry_runs(cmd, shape_dirs, tmp_path, capsys):
    script, argv, world = split(cmd)
    config = argv[argv.index("--config") + 1]
    standin = STANDINS.get(config)
    if standin:
        argv[argv.index("--config") + 1] = str(standin)
    if "--world-size" not in argv:
        if world is None:
            raw = yaml.safe_load((ROOT / argv[argv.index("--config") + 1]).read_text())
            world = math.prod(raw["model_topo"]["process_topology"]["dims"])
        argv += ["--world-size", str(world)]
    if "--dry-run" not in argv:
        argv.append("--dry-run")
    argv += ["--set", f"model_path={shape_dirs / model_for(config)}", "--set", f"data_path={DATA}",
             "--set", f"save_path={tmp_path / 'save'}"]
    try:
        load_main(script)(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 0, f"{cmd}\n-> {script} {shlex.join(argv)}\n{err}"
    assert "dry run:" in out and "error" not in err, f"{cmd}\n{out}\n{err}"
    assert not (tmp_path / "save").exists()  # a dry run writes nothing


@pytest.mark.parametrize("cmd", OTHER)
def test_command_arguments_parse(cmd, monkeypatch, capsys, tmp_path):
    script, argv, _ = split(cmd)
    monkeypatch.chdir(tmp_path)  # README's `@file` arguments are the user's files, read while parsing
    for word in argv:
        if word.startswith("@"):
            (tmp_path / word[1:]).write_text("a text the user wrote\n")
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    main = load_main(script)
    with pytest.raises(Parsed) as parsed:
        try:
            main(argv)
        except SystemExit as e:  # argparse's error: a flag the script does not take, a missing argument
            pytest.fail(f"{cmd}: exit {e.code}\n{capsys.readouterr().err}")
    assert isinstance(parsed.value.args[0], argparse.Namespace)
