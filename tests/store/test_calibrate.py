"""The calibrated prepare: each expert's input statistics equal those of transformers' own forward on the
calibration text, never-routed experts get the layer's, and the store records errors the planners can use."""
import json
import math

import pytest
import torch
import transformers as T

import dynaexq.store.prepare as prep
from dynaexq.engine.calibrate import POOL, prepare_store
from dynaexq.store import layout
from models import make_checkpoint


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 32 + 127))}}
    t = Tokenizer(models.WordLevel(vocab={k: v for k, v in vocab.items() if v < 128}, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return t


@pytest.fixture(scope="module", params=["float32"])
def tiny(tmp_path_factory, request):
    """A calibratable checkpoint in `request.param`'s dtype (tests ask for bfloat16 with indirect parametrization:
    the pass then builds the model in bf16 and upcasts one layer at a time; the references stay transformers'
    float32 model)."""
    root = tmp_path_factory.mktemp("cal")
    ck = make_checkpoint("qwen3_moe", root / "ck", dtype=getattr(torch, request.param))
    T.PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), eos_token="<eos>").save_pretrained(ck)
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 200)
    return ck, text


def _reference_moments(ck, ids):
    """Per (layer, expert): sum x x^T, sum h h^T and token counts, from transformers' own model and experts."""
    model = T.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, experts_implementation="eager").eval()
    out, hooks = {}, []
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Qwen3MoeExperts":
            layer = int(name.split(".")[2])

            def hook(m, args, res, layer=layer):
                x, idx = args[0].double(), args[1]
                for e in range(m.gate_up_proj.shape[0]):
                    xe = x[(idx == e).any(-1)]
                    g, u = (xe @ m.gate_up_proj[e].double().T).chunk(2, -1)
                    h = torch.nn.functional.silu(g) * u
                    out[(layer, e)] = (len(xe), xe.T @ xe, h.T @ h)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    return out


def _capture(monkeypatch) -> dict:
    """{layer: {expert: the second moments prepare quantized it against}}, filled as prepare runs."""
    seen, real = {}, prep.PrepareJob.write_layer

    def capture(self, layer, experts, hessians=None):
        seen[layer] = {e: hessians(e) for e in range(len(experts))}
        return real(self, layer, experts, hessians)

    monkeypatch.setattr(prep.PrepareJob, "write_layer", capture)
    return seen


@pytest.mark.parametrize("tiny,chunk_tokens", [("float32", 4096), ("float32", 32), ("bfloat16", 32)],
                         indirect=["tiny"])  # all windows through a layer at once; one window a chunk
def test_each_experts_moments_are_its_routed_inputs_pooled_with_the_layer(tiny, tmp_path, monkeypatch, chunk_tokens):
    ck, text = tiny
    seen = _capture(monkeypatch)
    from dynaexq.engine import calibrate
    monkeypatch.setattr(calibrate, "CHUNK_TOKENS", chunk_tokens)
    store = prepare_store(ck, tmp_path / "st", ["bf16", "int4", "int2"], [str(text)], windows=4, window_tokens=32,
                          progress=False)
    from dynaexq.engine.model import calibration_tokens, load_tokenizer
    ids = calibration_tokens(load_tokenizer(ck), [text], 4, 32)
    ref = _reference_moments(ck, ids)
    for layer in (0, 1):  # layer 1's inputs come through layer 0 as the calibration pass computed it
        n_all = sum(ref[(layer, e)][0] for e in range(8))
        mx = sum(ref[(layer, e)][1] for e in range(8)) / n_all
        mh = sum(ref[(layer, e)][2] for e in range(8)) / n_all
        for e in range(8):
            n, xx, hh = ref[(layer, e)]
            want_x, want_h = (xx + POOL * mx) / (n + POOL), (hh + POOL * mh) / (n + POOL)
            got = seen[layer][e]
            assert torch.allclose(got["gate_up"].double(), want_x, rtol=1e-4, atol=1e-6), (layer, e)
            assert torch.allclose(got["down"].double(), want_h, rtol=1e-4, atol=1e-6), (layer, e)
    m = json.loads((store / layout.MANIFEST).read_text())
    assert m["calibration"]["tokens"] == 4 * 32 and m["calibration"]["files"][0]["name"] == "text.txt"
    for stats in m["experts"].values():  # finite, positive, and lower bits -> larger errors, for every expert
        e4, e2 = stats["int4"]["error"], stats["int2"]["error"]
        assert all(0 < a < b and math.isfinite(b) for a, b in zip(e4, e2))
        assert all(v > 0 and math.isfinite(v) for v in stats["int4"]["energy"])


@pytest.mark.parametrize("tiny,chunk_tokens", [("float32", 4096), ("float32", 32), ("bfloat16", 32)],
                         indirect=["tiny"])
def test_each_dense_matrix_is_quantized_against_its_inputs_moment_over_every_token(tiny, tmp_path, monkeypatch,
                                                                                  chunk_tokens):
    ck, text = tiny
    from dynaexq.engine import calibrate
    monkeypatch.setattr(calibrate, "CHUNK_TOKENS", chunk_tokens)
    got, real = {}, prep.PrepareJob.add_dense

    def capture(self, name, H=None, W=None):
        got[name] = H
        return real(self, name, H, W)

    monkeypatch.setattr(prep.PrepareJob, "add_dense", capture)
    prepare_store(ck, tmp_path / "st", ["int4"], [str(text)], windows=4, window_tokens=32, progress=False)
    from dynaexq.engine.model import calibration_tokens, load_tokenizer
    ids = calibration_tokens(load_tokenizer(ck), [text], 4, 32)
    # the reference: transformers' own model, every linear's input over every token, in float64
    model = T.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, experts_implementation="eager").eval()
    want, hooks = {}, []
    for name, mod in model.named_modules():
        if name in got and isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                want[name] = x.T @ x / len(x)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    linear = [n for n in got if n in want]
    assert any("q_proj" in n for n in linear) and any("o_proj" in n for n in linear) and "lm_head" in linear
    for name in linear:
        assert torch.allclose(got[name].double(), want[name], rtol=1e-4, atol=1e-6), name
    assert got["model.embed_tokens"] is None  # read by rows: weight error


def test_a_never_routed_expert_gets_the_layers_statistics(tiny, tmp_path, monkeypatch):
    ck, text = tiny
    seen = _capture(monkeypatch)
    from dynaexq.engine import calibrate

    real_call = calibrate._LayerCalibrator.__call__

    def no_expert_3(self, bank, hidden, idx, w):  # reroute every choice of expert 3 to expert 4
        return real_call(self, bank, hidden, torch.where(idx == 3, 4, idx), w)

    monkeypatch.setattr(calibrate._LayerCalibrator, "__call__", no_expert_3)
    prepare_store(ck, tmp_path / "st", ["int4"], [str(text)], windows=2, window_tokens=32, progress=False)
    for layer, hs in seen.items():
        h3 = hs[3]["gate_up"]
        assert torch.isfinite(h3).all() and h3.diagonal().min() > 0  # the layer's mean, not zero, not NaN


def test_without_a_tokenizer_or_with_none_prepare_says_it_does_not_calibrate(tmp_path, capsys):
    ck = make_checkpoint("qwen3_moe", tmp_path / "ck")  # no tokenizer files
    st = prepare_store(ck, tmp_path / "st", ["int4"], progress=False)
    assert "without calibration (the checkpoint has no tokenizer)" in capsys.readouterr().err
    assert json.loads((st / layout.MANIFEST).read_text())["calibration"] is None
    prepare_store(ck, tmp_path / "st2", ["int4"], ["none"], progress=False)
    assert "--calibration none" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["phimoe", "gpt_oss"])  # LayerNorms; attention sinks and sliding windows
def test_a_16_bit_checkpoint_calibrates_as_its_float32_copy(arch, tmp_path, monkeypatch):
    """The pass builds a bf16 checkpoint's model in bf16 and upcasts one layer at a time: every second moment it
    quantizes against must be the one the float32 copy of the same weights gives (that model runs in float32
    throughout), bit for bit."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 200)
    ck16 = make_checkpoint(arch, tmp_path / "ck16", dtype=torch.bfloat16)
    ck32 = tmp_path / "ck32"
    T.AutoModelForCausalLM.from_pretrained(ck16, dtype=torch.float32).save_pretrained(ck32)
    experts = _capture(monkeypatch)
    dense, real = {}, prep.PrepareJob.add_dense
    monkeypatch.setattr(prep.PrepareJob, "add_dense", lambda self, name, H=None, W=None: (
        dense.__setitem__(name, H), real(self, name, H, W))[1])
    runs = []
    for ck in (ck16, ck32):
        T.PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), eos_token="<eos>").save_pretrained(ck)
        prepare_store(ck, tmp_path / f"st-{ck.name}", ["int4"], [str(text)], windows=4, window_tokens=32,
                      progress=False)
        runs.append(({layer: dict(hs) for layer, hs in experts.items()}, dict(dense)))
        experts.clear()
        dense.clear()
    (e16, d16), (e32, d32) = runs
    assert e32 and e16.keys() == e32.keys()
    for layer, hs in e32.items():
        for e, h in hs.items():
            for m in ("gate_up", "down"):
                assert torch.equal(e16[layer][e][m], h[m]), (layer, e, m)
    assert any(H is not None for H in d32.values()) and d16.keys() == d32.keys()
    for name, H in d32.items():
        assert (H is None and d16[name] is None) or torch.equal(d16[name], H), name
