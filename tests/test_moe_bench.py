"""bench/moe_bench.py on the CPU: argument parsing, the gradient modes' set-up, and one iteration of
every table (the GPU run is a bench/steps_moe.txt step)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import moe_bench  # noqa: E402


def test_grad_modes_are_trainings():
    """bf16: a step's gradient is that step's alone (fresh .grad); fp32: the experts' and router's
    gradients land in main_grad only; fp32-hook: the experts' bf16 gradient is added into the fp32
    buffer and freed, the router stays fused."""
    args = moe_bench.moe_args(64, 96, 4, 2)
    torch.manual_seed(0)
    moe = moe_bench.mixtral.SparseMoE(args).to(torch.bfloat16)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    plain = moe_bench.with_grad_mode(moe, "bf16", moe=True)
    step = moe_bench.step_fn(plain, compiled=False)
    step(x, g)
    once = plain.experts.down_proj.grad.clone()
    step(x, g)
    assert torch.equal(plain.experts.down_proj.grad, once)  # not 2x: no add into the old gradient
    for mode in ("fp32", "fp32-hook"):
        m = moe_bench.with_grad_mode(moe, mode, moe=True)
        moe_bench.step_fn(m, compiled=False)(x, g)
        moe_bench.step_fn(m, compiled=False)(x, g)
        w = m.experts.down_proj
        assert w.grad is None and m.gate.weight.grad is None and hasattr(m.gate.weight, "main_grad")
        buffer = w.main_grad if mode == "fp32" else w.hook_buffer
        assert hasattr(w, "main_grad") == (mode == "fp32")
        torch.testing.assert_close(buffer, 2 * once.float(), rtol=2e-2, atol=2e-3)  # two steps accumulated in fp32


def test_tiny_smoke_run(capsys):
    assert moe_bench.main(["--tiny", "--tokens", "24", "--iters", "1", "--warmup", "0", "--compile", "off"])
    out = capsys.readouterr().out
    rows = {line.split()[1] for line in out.splitlines() if line.strip().startswith("24 ")}
    assert set(moe_bench.MODES) <= rows  # one layer row per gradient mode
    gemms = [line for line in out.splitlines() if line.strip().startswith("24 ") and ("wgrad" in line or "grad " in
                                                                                      line or "fwd" in line)]
    assert len(gemms) == 8 and all(float(line.split()[-1]) > 0 for line in gemms)
    assert "MOE BENCH PASS" in out


@pytest.mark.parametrize("argv, msg", [(["--modes", "fp16"], "--modes: unknown fp16"),
                                       (["--tokens", "2k"], "--tokens: comma-separated integers")])
def test_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        moe_bench.parse(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_fp8_sweep_and_gqa_bench_smoke(capsys):
    """bench/fp8_sweep.py (the FP8_SPEEDUP table's source) and bench/gqa_flex_bench.py parse their
    arguments and run their CPU paths once (fp8 itself needs FP8 tensor cores: GPU steps)."""
    import fp8_sweep
    import gqa_flex_bench

    assert fp8_sweep.main(["--tiny"]) == [] and "    64     1 " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        fp8_sweep.parse(["--hidden", "4000"])
    assert e.value.code == 2 and "multiples of 128" in capsys.readouterr().err
    gqa_flex_bench.main(["--tiny", "--iters", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("chatglm3", "llama"))]
    assert len(rows) == 2 and all(float(x) > 0 for r in rows for x in r[3:])


def test_gpu_steps_parse():
    """bench/steps_moe.txt and steps_fp8.txt (bench/round.sh's `name|seconds|command`): every step is
    well-formed within round.sh's per-call budget, and our benches accept their arguments."""
    import shlex

    import fp8_sweep
    import gpu_check

    bench = Path(__file__).resolve().parent.parent / "bench"
    names = []
    for steps in ("steps_moe.txt", "steps_fp8.txt"):
        for line in (bench / steps).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            name, secs, cmd = line.split("|", 2)
            names.append(name)
            assert 0 < int(secs) <= 90 and cmd.strip(), line
            argv = shlex.split(cmd)
            if argv[:2] == ["python3", "bench/moe_bench.py"]:
                moe_bench.parse(argv[2:])
            elif argv[:2] == ["python3", "bench/fp8_sweep.py"]:
                fp8_sweep.parse(argv[2:])
    assert len(names) == len(set(names)) and callable(gpu_check.expert_wgrad_check)
    assert {"moe", "mixtral", "ref_mixtral", "llama", "ref_llama", "chatglm", "ref_chatglm", "table"} <= set(names)
