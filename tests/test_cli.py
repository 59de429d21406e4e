"""The CLI end to end on the real small model (offline once cached)."""

import json
import re

import pytest
from typer.testing import CliRunner

from llmpatch.cli import app, parse_sets

runner = CliRunner()


def test_parse_sets():
    assert parse_sets(["window=64", "layers=[1,2]", "mode=uniform", "act.beta=0.3"]) == {
        "window": 64,
        "layers": [1, 2],
        "mode": "uniform",
        "act": {"beta": 0.3},
    }


def test_methods_command():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0 and "sink_window" in result.output and "window" in result.output


def test_bad_set_is_a_clear_error(smollm2):
    result = runner.invoke(app, ["apply", "--method", "sink_window", "--model", "smollm2-135m", "-p", "hi",
                                 "--set", "window=-3"])  # fmt: skip
    assert result.exit_code == 2
    assert "sink_window: parameter 'window' must be an int >= 1, got -3" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-memory", "cpu=1GiB"], "--max-memory: give it with --device-map"),
        (["--device-map", "{bad"], "--device-map: not valid JSON"),
        (["--device-map", "auto", "--max-memory", "lots"], "--max-memory: expected device=size pairs"),
        (["--backend", "bogus"], "backend: must be one of reference, sdpa, cpu, triton"),
        (
            ["--save-plan", "/no/such/folder/p.json"],
            "--save-plan: '/no/such/folder/p.json' must be a file in",
        ),
        (["--json", "."], "--json: '.' must be a file in an existing folder"),
        (["--prompt-file", "."], "--prompt-file: '.' is a folder; give a text file"),
        (["--plan", "."], "plan: file '.' is a folder, not a plan file"),
        (
            ["--method", "sink_window", "--set", "window=-3"],
            "sink_window: parameter 'window' must be an int >= 1",
        ),
        (["--method", "moa", "--set", "bogus=1"], "moa: unknown parameter 'bogus'"),
        (["--method", "dense", "--method", "dense"], "method: ['dense', 'dense'] names a method twice"),
        (["--plan", "README.md"], "plan: 'README.md' is not a JSON plan"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads(args, message):
    """A missing model would be the error if these were checked after loading it."""
    args = args if "--method" in args else ["--method", "dense", *args]
    result = runner.invoke(app, ["apply", "--model", "no/such-model", "-p", "hi", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_device_map_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["apply", "--method", "dense", "--model", "no/such-model", "-p", "hi",
                                 "--device-map", "auto"])  # fmt: skip
    assert result.exit_code == 2 and "--device-map: not under torchrun" in result.output, result.output


@pytest.mark.real
def test_info_and_models_list(smollm2):
    result = runner.invoke(app, ["info", "--model", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    assert "llama" in result.output and "num_kv_heads" in result.output
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "gemma3-270m" in result.output


@pytest.mark.real
def test_apply_compare_writes_json(smollm2, tmp_path):
    out, plan = tmp_path / "run.json", tmp_path / "plan.json"
    result = runner.invoke(app, ["apply", "--method", "sink_window", "--set", "window=8", "--set", "sink=4", "--model", "smollm2-135m",
                                 "--prompt", "What is the capital of France?", "--max-new-tokens", "6", "--compare",
                                 "--json", str(out), "--save-plan", str(plan)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "unpatched" in result.output and "sink_window" in result.output and "TTFT" in result.output
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"unpatched", "sink_window"}
    assert "saved" in result.output and "attn" in result.output
    for run in data["runs"].values():
        assert run["new_tokens"] >= 1 and run["ttft_s"] > 0 and run["peak_memory_mb"] > 0
    assert data["runs"]["unpatched"]["attention_computed"] == 1.0
    assert data["runs"]["sink_window"]["attention_computed"] < 1.0
    assert {"llmpatch", "torch", "transformers", "git_commit", "argv"} <= set(data["metadata"])
    assert json.loads(plan.read_text())["methods"][0]["params"]["window"] == 8
    result = runner.invoke(app, ["apply", "--method", "sink_window", "--plan", str(plan), "--model", "smollm2-135m",
                                 "--prompt", "Hi", "--max-new-tokens", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_calibrate_retrieval_imports_the_official_format(smollm2, tmp_path):
    official = {f"{li}-{hi}": [0.0] for li in range(30) for hi in range(9)}
    official["17-3"] = [0.6, 0.4]
    (tmp_path / "o.json").write_text(json.dumps(official))
    out = tmp_path / "heads.json"
    res = runner.invoke(app, ["calibrate", "retrieval", "--model", "smollm2-135m", "--import-official",
                              str(tmp_path / "o.json"), "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1 of 270 heads" in res.output and out.with_suffix(".png").is_file()
    assert json.loads(out.read_text())["methods"][0]["params"]["scores"][17][3] == 0.5
    bad = runner.invoke(
        app, ["calibrate", "act", "--model", "smollm2-135m", "--beta", "2", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "'beta' must be a number in [0, 1]" in bad.output


def test_calibrate_moa_imports_and_exports_the_official_format(smollm2, tmp_path):
    official = {"alphas": [[64.0] * 9] * 30, "betas": [[0.25] * 9] * 30}
    (tmp_path / "o.json").write_text(json.dumps(official))
    out, back = tmp_path / "moa.json", tmp_path / "back.json"
    res = runner.invoke(app, ["calibrate", "moa", "--model", "smollm2-135m", "--import-official",
                              str(tmp_path / "o.json"), "--export-official", str(back), "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(back.read_text()) == official
    assert json.loads(out.read_text())["methods"][0]["params"]["betas"][0][0] == 0.25
    (tmp_path / "bad.json").write_text(json.dumps({"alphas": [[1.0] * 9] * 29, "betas": [[0.1] * 9] * 29}))
    bad = runner.invoke(app, ["calibrate", "moa", "--model", "smollm2-135m", "--import-official",
                              str(tmp_path / "bad.json"), "--out", str(out)])  # fmt: skip
    assert bad.exit_code == 2 and "'alphas' must be [30][9]" in bad.output
    bad = runner.invoke(app, ["calibrate", "moa", "--model", "smollm2-135m", "--lengths", "65536",
                              "--out", str(out)])  # fmt: skip
    assert bad.exit_code == 2 and "lengths:" in bad.output and "8192" in bad.output
    bad = runner.invoke(
        app, ["calibrate", "moa", "--model", "smollm2-135m", "--density", "0", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "density: must be a number in (0, 1]" in bad.output


@pytest.mark.real
def test_calibrate_retrieval_runs_without_the_eval_extra(smollm2, tmp_path):
    """`pip install -e .` has neither matplotlib nor lm-eval: the calibration runs and skips its plot with a note
    (a tiny random llama with SmolLM2's tokenizer, in a subprocess where those imports fail)."""
    import shutil
    import subprocess
    import sys

    from llmpatch.models import cache_dir
    from llmpatch.testing import tiny_model

    model_dir = tmp_path / "tiny"
    tiny_model("llama", vocab_size=49152, max_position_embeddings=2048).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cache_dir() / "models" / "smollm2-135m" / "hf" / name, model_dir / name)
    out = tmp_path / "heads.json"
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['lm_eval'] = None; "
        "from llmpatch.cli import main; sys.argv = ['llmpatch', 'calibrate', 'retrieval', '--model', "
        f"{str(model_dir)!r}, '--lengths', '256', '--depths', '0.5', '--out', {str(out)!r}]; main()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "plots skipped: matplotlib is not installed" in res.stdout + res.stderr
    assert json.loads(out.read_text())["methods"][0]["name"] == "retrieval_heads"
    assert not out.with_suffix(".png").exists()


def test_bench_accuracy_runs_resumes_and_refuses_bad_input(smollm2, tmp_path):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "model: smollm2-135m\nmix: {split: dev, samples: 1, length: 300, families: [niah_number]}\n"
        "methods:\n  - {label: snapkv-50, method: snapkv, params: {keep: 64, window: 32}, protocols: [A, B]}\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["eval", str(recipe), "--out", str(out)]
    )  # a mix recipe runs as bench accuracy
    assert result.exit_code == 0, result.output
    assert {"dense.A.jsonl", "snapkv-50.A.jsonl", "snapkv-50.B.jsonl", "summary.md"} <= {
        p.name for p in out.iterdir()
    }
    assert "snapkv-50" in result.output
    result = runner.invoke(app, ["bench", "accuracy", str(recipe), "--out", str(out), "--report-only"])
    assert result.exit_code == 0 and "dense" in result.output
    result = runner.invoke(
        app, ["bench", "accuracy", str(recipe), "--out", str(tmp_path / "no"), "--report-only"]
    )
    assert result.exit_code == 2 and "not a folder of results" in result.output
    result = runner.invoke(app, ["bench", "accuracy", str(recipe), "--only", "bogus"])
    assert result.exit_code == 2 and "--only: unknown label 'bogus'" in result.output
    recipe.write_text("model: smollm2-135m\nmix: {split: train}\n")
    result = runner.invoke(app, ["bench", "accuracy", str(recipe)])
    assert result.exit_code == 2 and "mix.split" in result.output


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback():
    import subprocess
    import sys

    code = ("import sys, llmpatch.cli as c\n"
            "def boom(**_): raise RuntimeError('boom [1, 2]')\n"
            "c.app = boom\nsys.argv = ['llmpatch', *sys.argv[1:]]\nc.main()")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: RuntimeError: boom [1, 2] (an unexpected failure; run again with --debug" in " ".join(
        done.stderr.split()
    )
    done = subprocess.run([sys.executable, "-c", code, "--debug"], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: boom" in done.stderr


@pytest.mark.real
def test_a_prompt_past_the_context_is_refused_unless_asked(smollm2, tmp_path):
    from llmpatch.testing import tiny_model

    d = tmp_path / "tiny"  # max_position_embeddings 512
    tiny_model("llama", vocab_size=len(smollm2[1])).save_pretrained(d)
    smollm2[1].save_pretrained(d)
    args = ["apply", "--method", "dense", "--model", str(d), "--raw", "--max-new-tokens", "2",
            "--prompt", "one two three " * 200]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = r"prompt: \d+ tokens \+ --max-new-tokens 2 is past the model's context of 512 tokens"
    assert re.search(message, " ".join(result.output.split())), result.output
    result = runner.invoke(app, [*args, "--beyond-context"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "kernels", "--device", "cuda"], "--device: 'cuda' is not available here"),
        (["bench", "kernels", "--device", "tpu"], "--device: must be cpu or cuda, got 'tpu'"),
        (["lm-eval", "--model", "llmpatch", "--model_args", "pretrained=smollm2-135m,method=bogus", "--tasks", "x"],
         "method: unknown method 'bogus'"),
        (["lm-eval", "--model", "llmpatch", "--model_args", "pretrained=x,method=sink_window,window=-2"],
         "sink_window: parameter 'window' must be an int >= 1, got -2"),
        (["eval", "GARBAGE"], "not valid YAML"),
        (["run", "bogus", "--model", "smollm2-135m"], "suite: unknown suite 'bogus'"),
        (["run", "passkey", "--model", "smollm2-135m", "--lengths", "abc"], "--lengths: expected comma-separated"),
        (["run", "niah", "--model", "no/such", "--depths", "0.5,1.5"], "--depths: each depth must be in [0, 1]"),
        (["calibrate", "moa", "--model", "no/such", "--density", "0"], "density: must be a number in (0, 1]"),
        (["calibrate", "moa", "--model", "no/such", "--lengths", "100"], "lengths: profiling and validation lengths"),
        (["calibrate", "act", "--model", "no/such", "--beta", "3"], "act: parameter 'beta' must be a number in [0, 1]"),
        (["run", "passkey", "--model", "no/such", "--method", "moa", "--set", "alphas=[[NaN]]"], "moa: parameter"),
    ],
)  # fmt: skip
def test_cli_failures_are_one_error_line(args, message, tmp_path):
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("foo: [1, 2\n  bar")
    result = runner.invoke(app, [str(garbage) if a == "GARBAGE" else a for a in args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_bench_model_names_a_refused_configuration_without_a_traceback(smollm2):
    """The configuration is refused inside bench model's subprocess; the parent prints apply()'s message alone."""
    args = ["bench", "model", "--model", "smollm2-135m", "--method", "moa", "--length", "64", "--repeats", "1",
            "--decode-tokens", "1"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "moa: parameters 'alphas' and 'betas' are required" in " ".join(result.output.split())


def test_text_with_brackets_is_printed_as_written():
    result = runner.invoke(app, ["methods"])
    assert "[layer," in result.output, result.output  # the table may wrap the rest
    result = runner.invoke(app, ["calibrate", "retrieval", "--help"], terminal_width=200)
    assert "{'layer-head': [scores]}" in result.output, result.output
    result = runner.invoke(
        app, ["apply", "--method", "act", "--model", "no/such", "-p", "hi", "--set", "beta=[0.5]"]
    )
    assert result.exit_code == 2 and "must be a number in [0, 1], got [0.5]" in result.output, result.output


@pytest.mark.parametrize(
    "args, line",
    [
        (["apply", "--bogus"], "error: usage: No such option: --bogus"),
        (["apply", "--method", "dense"], "error: --model: Missing option '--model'"),
        (["apply", "--method", "dense", "--model", "x", "-p", "hi", "--max-new-tokens", "0"],
         "error: --max-new-tokens: Input should be greater than or equal to 1"),
    ],
)  # fmt: skip
def test_usage_errors_are_error_lines_too(args, line):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "llmpatch", *args], capture_output=True, text=True)
    assert done.returncode == 2 and line in " ".join(done.stderr.split()), done.stderr
