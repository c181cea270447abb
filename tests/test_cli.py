"""The `dynaexq` command end to end, and every bad input the issue lists: a clear one-paragraph error,
exit code 2, and nothing half-written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as T

from dynaexq.cli import main
from dynaexq.quant.precision import Precision
from dynaexq.store import layout
from models import COMMON, make_checkpoint


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _no_leftovers(path: Path):
    return not path.exists() or (not layout.is_store(path) and not list(path.rglob("*.tmp")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ck = make_checkpoint("qwen3_moe", root / "ck")
    tok = T.PreTrainedTokenizerFast(tokenizer_object=_char_tokenizer(), eos_token="<eos>", pad_token="<eos>")
    tok.save_pretrained(ck)
    return ck


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(32, 32 + 127))}}
    t = Tokenizer(models.WordLevel(vocab={k: v for k, v in vocab.items() if v < 128}, unk_token="<eos>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return t


def test_prepare_inspect_generate_roundtrip(tiny, tmp_path, capsys):
    store = tmp_path / "st"
    code, _, err = run(capsys, "prepare", tiny, "--out", store, "--precisions", "bf16,int4,int2")
    assert code == 0 and "store ready" in err and layout.is_store(store)
    code, out, _ = run(capsys, "inspect", store, "--json", "--verify")
    report = json.loads(out)
    assert code == 0 and report["integrity"] == "ok" and set(report["precisions"]) == {"bf16", "int4", "int2"}
    assert report["precisions"]["int2"]["bytes"] < report["precisions"]["int4"]["bytes"]
    code, out, err = run(capsys, "generate", "--model", store, "--policy", "uniform:int4", "--max-new-tokens", 5, "ab")
    assert code == 0 and out.startswith("ab") and "uniform:int4" in err and "{'int4': 16}" in err


def test_generate_prepares_a_checkpoint_into_the_cache_and_says_so(tiny, capsys):
    code, _, err = run(capsys, "generate", "--model", tiny, "--max-new-tokens", 3, "--expert-budget", "10MiB", "x")
    assert code == 0 and "preparing" in err and os.environ["DYNAEXQ_CACHE"] in err
    code, _, err = run(capsys, "generate", "--model", tiny, "--max-new-tokens", 3, "x")
    assert code == 0 and "preparing" not in err  # reused


def test_inspect_checkpoint_estimates_bytes(tiny, capsys):
    code, out, _ = run(capsys, "inspect", tiny)
    assert code == 0 and "qwen3_moe" in out and "2 x 8" in out


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "dynaexq"
    proc = subprocess.run([str(exe), "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# --- bad input: each a clear error, exit code 2, nothing half-written ------------------------------

def test_missing_directory(tmp_path, capsys):
    code, _, err = run(capsys, "prepare", tmp_path / "missing", "--out", tmp_path / "out")
    assert code == 2 and "does not exist" in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_dense_model_is_refused(tmp_path, capsys):
    cfg = T.LlamaConfig(**{k: v for k, v in COMMON.items()}, intermediate_size=32)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    code, _, err = run(capsys, "prepare", tmp_path / "dense", "--out", tmp_path / "out")
    assert code == 2 and "unsupported architecture 'llama'" in err and "dense" in err and "qwen3_moe" in err
    assert _no_leftovers(tmp_path / "out")


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model_type": "jetmoe"}))
    code, _, err = run(capsys, "inspect", tmp_path / "ck")
    assert code == 2 and "'jetmoe'" in err and all(a in err for a in ["mixtral", "gpt_oss", "deepseek_v3"])


def test_truncated_safetensors(tiny, tmp_path, capsys):
    import shutil

    ck = shutil.copytree(tiny, tmp_path / "ck")
    shard = sorted(ck.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run(capsys, "prepare", ck, "--out", tmp_path / "out")
    assert code == 2 and "truncated or corrupted" in err and shard.name in err
    assert _no_leftovers(tmp_path / "out")


def test_corrupted_store_shard_sha256(tiny, tmp_path, capsys):
    store = tmp_path / "st"
    assert run(capsys, "prepare", tiny, "--out", store, "--precisions", "int4")[0] == 0
    shard = store / layout.expert_shard(1, Precision.INT4)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # flip bits in tensor data; the header still parses
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "generate", "--model", store, "--policy", "uniform:int4", "x")
    assert code == 2 and "does not match its size and sampled hash" in err and "L001.int4" in err  # the stamp
    code, _, err = run(capsys, "generate", "--model", store, "--policy", "uniform:int4", "--verify", "full", "x")
    assert code == 2 and "does not match its sha256" in err and "L001.int4" in err
    code, out, _ = run(capsys, "inspect", store, "--verify")
    assert code == 2 and "does not match its sha256" in out


def test_store_from_a_different_checkpoint(tiny, tmp_path, capsys):
    other = make_checkpoint("qwen3_moe", tmp_path / "other", seed=5)
    store = tmp_path / "st"
    assert run(capsys, "prepare", other, "--out", store, "--precisions", "int4")[0] == 0
    code, _, err = run(capsys, "generate", "--model", tiny, "--store", store, "--policy", "uniform:int4", "x")
    assert code == 2 and "was prepared from" in err and str(other) in err


def test_unknown_precision(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "prepare", tiny, "--out", tmp_path / "out", "--precisions", "int4,int5")
    assert code == 2 and "unknown precision 'int5'" in err and "int2" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "generate", "--model", tiny, "--policy", "uniform:fp8", "x")
    assert code == 2 and "unknown precision 'fp8'" in err


def test_unparsable_size(tiny, capsys):
    code, _, err = run(capsys, "generate", "--model", tiny, "--expert-budget", "12 parsecs", "x")
    assert code == 2 and "cannot parse size '12 parsecs'" in err and "20GiB" in err


def test_budget_too_small_names_the_bytes_needed(tiny, capsys):
    code, _, err = run(capsys, "generate", "--model", tiny, "--policy", "uniform:bf16", "--expert-budget", "100KB", "x")
    assert code == 2 and "needs 196608 bytes" in err and "budget is 100000 bytes" in err
    assert "int2" in err  # names what would fit


def test_map_policy_and_its_errors(tiny, tmp_path, capsys):
    good = tmp_path / "map.json"
    good.write_text(json.dumps({"default": "int2", "layers": {"1": {"3": "bf16"}}}))
    code, _, err = run(capsys, "generate", "--model", tiny, "--policy", f"map:{good}", "--max-new-tokens", 2, "x")
    assert code == 0 and "'int2': 15" in err and "'bf16': 1" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"default": "int2", "layers": {"7": "int4"}}))
    code, _, err = run(capsys, "generate", "--model", tiny, "--policy", f"map:{bad}", "x")
    assert code == 2 and "layer '7'" in err and "[0, 1]" in err
    code, _, err = run(capsys, "generate", "--model", tiny, "--policy", "lru", "x")
    assert code == 2 and "unknown policy 'lru'" in err


def test_sizes_parse_units():
    from dynaexq.sizes import parse_size

    assert parse_size("20GiB") == 20 * 2**30 and parse_size("512MB") == 512 * 10**6
    assert parse_size("123456") == 123456 and parse_size("1.5G") == 1_500_000_000


def test_generate_without_model_uses_the_bundled_model(capsys):
    code, out, err = run(capsys, "generate", "--policy", "uniform:int2", "--max-new-tokens", 4, "def f(x):")
    assert code == 0 and out.startswith("def f(x):") and "dxq-moe-mini" in err and "preparing" in err
    assert "{'int2': 192}" in err  # 6 MoE layers x 32 experts


@pytest.mark.parametrize("command,flag,extra", [
    ("eval", "--data", []), ("eval", "--policy", []), ("eval", "--expert-budget", []), ("eval", "--calibration", []),
    ("generate", "--calibration", ["x"]), ("serve", "--calibration", []), ("lm-eval", "--calibration", ["task"]),
    ("lm-eval", "--include-path", ["task"])])
def test_list_flags_accept_repeated_and_space_separated_values(command, flag, extra):
    from dynaexq.cli import build_parser

    dest = flag.lstrip("-").replace("-", "_")
    repeated = build_parser().parse_args([command, *extra, flag, "a=1", flag, "b=2"])
    spaced = build_parser().parse_args([command, *extra, flag, "a=1", "b=2"])
    assert getattr(repeated, dest) == getattr(spaced, dest) == ["a=1", "b=2"]


def test_calibration_accepts_name_equals_file_like_data(tmp_path):
    from dynaexq.engine.model import calibration_files

    f = tmp_path / "notes.txt"
    f.write_text("some text")
    assert calibration_files(tmp_path, None, [f"prose={f}", str(f)]) == [f, f]
    with pytest.raises(Exception, match="do not exist"):
        calibration_files(tmp_path, None, [f"prose={tmp_path / 'missing.txt'}"])


@pytest.mark.parametrize("command", [["generate", "x"], ["eval"], ["serve"], ["lm-eval", "task"]])
def test_device_flag_refuses_a_device_this_machine_does_not_have(tiny, capsys, command):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, _, err = run(capsys, *command, "--model", tiny, "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA device is available" in err and "--device cpu" in err, err


def test_the_python_prepare_makes_the_store_the_command_makes(tiny, tmp_path, capsys):
    import dynaexq
    code, _, err = run(capsys, "prepare", tiny, "--out", tmp_path / "cli", "--calibration-windows", "4")
    assert code == 0, err
    dynaexq.prepare(tiny, tmp_path / "api", windows=4, progress=False)
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("cli", "api"))
    assert a["calibration"] is not None and a["calibration"] == b["calibration"]  # calibrated, on the same text
    assert a["experts"] == b["experts"]  # every expert's digest at every precision
