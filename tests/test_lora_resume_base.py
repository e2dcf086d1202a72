"""Resuming a LoRA run loads the frozen base from the config's model_path: a model_path that is not
the dir the adapters were trained on (meta.json's lora.base) is refused with one line (issue 34)."""
import pytest

from engine.checkpoints import lora as CL
from engine.checkpoints.files import LayoutError
from engine.config import from_dict


def lora_cfg(model_path):
    return from_dict({"model_path": str(model_path), "data_path": "d.jsonl", "save_path": "s", "lora": {"r": 4},
                      "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}, "x.yml")


def test_resume_on_another_base_is_refused(tmp_path, monkeypatch):
    base, other, tag = tmp_path / "base", tmp_path / "other", tmp_path / "save" / "global_step2"
    for d in (base, other, tag):
        d.mkdir(parents=True)
    saved = CL.record(lora_cfg(base))
    checked = []
    monkeypatch.setattr(CL, "check_tensors", lambda *a: checked.append(a))  # the tensors' own check: not this test's
    with pytest.raises(LayoutError) as e:
        CL.check_resume(tag, saved, lora_cfg(other))
    assert str(e.value) == (f"{tag}/meta.json: lora.base: its adapters were trained on {base}, but model_path is "
                            f"{other}; resume with model_path: {base}, or use a new save_path")
    assert not checked
    # the same dir under another spelling (a symlink, a relative path) resumes
    (tmp_path / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path / "save")
    monkeypatch.setattr(CL, "Model", type("M", (), {"from_dir": staticmethod(lambda p: p)}))
    for spelling in (tmp_path / "link", "../base"):
        CL.check_resume(tag, saved, lora_cfg(spelling))
    assert [a[2] for a in checked] == [str(tmp_path / "link"), "../base"]
