"""CLI tests, in-process."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_causal_lm

from lazyneuron.cli import main


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "examples:" in capsys.readouterr().out


def test_models_lists_builtins(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "minilm-l6" in out


def test_inspect_local_directory(tmp_path, capsys) -> None:
    m = tiny_causal_lm("qwen2", layers=3)
    m.save_pretrained(tmp_path / "tiny")
    assert main(["inspect", "--model", str(tmp_path / "tiny"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["family"] == "llama" and rep["num_layers"] == 3 and len(rep["roles"]["mlp_out"]) == 3
    assert main(["inspect", "--model", str(tmp_path / "tiny")]) == 0
    assert "layer  2: attn_in=self_attn.q_proj" in capsys.readouterr().out


def test_bad_input_gives_one_line_error(capsys) -> None:
    assert main(["inspect", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'")
    assert main(["bench", "--model", "no-such-model", "--method", "activation_sparsity:sparsity=2"]) == 2
    assert "sparsity=2.0 is out of range" in capsys.readouterr().err


def test_plot_from_records(tmp_path, capsys) -> None:
    rec = {"model": "t", "method": "m", "params": {"s": 1}, "metric": "decode_speedup_b1", "value": 1.5, "unit": "x"}
    rec2 = dict(rec, metric="ppl_delta_pct", value=3.0)
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps(rec2) + "\n")
    assert main(["plot", "pareto", str(f), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_kernels_quick_json(capsys, monkeypatch) -> None:
    from lazyneuron.kernels import bench as kb

    monkeypatch.setitem(kb.QUICK, "shapes", [(256, 512)])
    monkeypatch.setitem(kb.QUICK, "repeats", 5)
    assert main(["bench-kernels", "--quick", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert {"shape", "batch", "sparsity", "dtype", "speedup_vs_torch", "pct_of_ideal"} <= set(recs[0])
    assert recs[0]["shape"] == "256x512"


def test_bench_kernels_cmm_quick_json(capsys, monkeypatch) -> None:
    from lazyneuron.kernels import bench as kb

    monkeypatch.setitem(kb.CMM_QUICK, "dims", [(64, 256, 5)])
    monkeypatch.setitem(kb.CMM_QUICK, "repeats", 5)
    assert main(["bench-kernels", "--kernel", "cmm", "--quick", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert {"d_model", "depth", "batch", "dtype", "speedup_vs_torch"} <= set(recs[0])
    assert [r["batch"] for r in recs] == kb.CMM_QUICK["batches"] and recs[0]["depth"] == 5 and recs[0]["speedup_vs_torch"] > 0


def test_bench_kernels_gemm_quick_json(capsys, monkeypatch) -> None:
    from lazyneuron.kernels import bench as kb
    from lazyneuron.kernels import gemv as G

    monkeypatch.setitem(kb.GEMM_QUICK, "shapes", [(40, 64, 96)])
    monkeypatch.setitem(kb.GEMM_QUICK, "repeats", 2)
    before = G.bf16_dot()
    assert main(["bench-kernels", "--kernel", "gemm", "--quick", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert {"shape", "dtype", "compute", "gflops", "speedup_vs_torch"} <= set(recs[0])
    assert [r["dtype"] for r in recs] == (["fp32", "bf16", "bf16", "int8", "int8"] if before else ["fp32", "bf16", "int8"])
    assert recs[0]["shape"] == "40x64x96" and all(r["gflops"] > 0 for r in recs)
    assert G.bf16_dot() == before  # the setting is restored


def test_transcribe_refuses_a_text_model(tmp_path, capsys) -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    assert main(["transcribe", "--model", str(tmp_path / "tiny"), str(tmp_path / "x.wav")]) != 0
    err = capsys.readouterr().err
    assert "not a Whisper model" in err
