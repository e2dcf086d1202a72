"""Fixtures shared across test modules (built once per session)."""
from pathlib import Path

import pytest

EXAMPLE_DATA = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "examples" / "data").glob("*.json*"))


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """A CLI's `main(argv)` in this process, as the command line runs it: (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A tiny sentencepiece llama tokenizer trained on examples/data (ids: pad 0, bos 1, eos 2, unk 3)."""
    from tests.tokenizer_util import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_pp(tmp_path_factory):
    """A tiny random llama converted to a pipeline checkpoint dir (its HF dir is ../hf); read-only."""
    from engine.checkpoints.convert import hf_to_pp
    from models.tiny import make_tiny_hf_model, sample_texts

    root = tmp_path_factory.mktemp("model")
    make_tiny_hf_model(root / "hf", "llama", sample_texts(EXAMPLE_DATA))
    return hf_to_pp(root / "hf", root / "pp")


@pytest.fixture(scope="session")
def launcher_reference(tiny_pp, tmp_path_factory):
    """[(step, loss)] of an uninterrupted run of tests/test_kill_resume.py's config under the real
    `deepspeed` launcher (2 CPU ranks): what every interrupted-and-resumed run must reproduce."""
    from tests.test_kill_resume import STEPS, launch, losses, wait_group, write_config

    save = tmp_path_factory.mktemp("ref") / "run"
    proc = launch(write_config(tiny_pp, save), save.parent / "log")
    assert wait_group(proc) == 0, (save.parent / "log").read_text()[-3000:]
    ref = losses(save)
    assert [s for s, _ in ref] == list(range(1, STEPS + 1))
    return ref
