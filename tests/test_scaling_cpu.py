"""The 4-process layouts of the scaling runs, proven on CPU: pp=4 and pp=2 x dp=2 train, and
pp=2 x dp=2 resumes bitwise (4 gloo ranks on the CI machine's cores)."""
from tests.dist import run_ranks
from tests.test_train import _train, config


def run4(raw) -> dict[int, float]:
    losses = run_ranks(_train, 4, raw)
    assert all(l == losses[0] for l in losses)
    return losses[0]


def test_pp4_trains(tiny_pp, tmp_path):
    losses = run4(config(tiny_pp, tmp_path / "pp4", dims=(4, 1), parts=(2, 1, 1, 2), steps=8,
                         gradient_accumulation_steps=4))
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2 - 0.1, losses


def test_pp2_dp2_resumes_bitwise(tiny_pp, tmp_path):
    raw = dict(dims=(2, 2), parts=(3, 3), gradient_accumulation_steps=2)
    full = run4(config(tiny_pp, tmp_path / "full", steps=4, **raw))
    first = run4(config(tiny_pp, tmp_path / "split", steps=2, **raw))
    second = run4(config(tiny_pp, tmp_path / "split", steps=4, **raw))
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    assert {**first, **second} == full
