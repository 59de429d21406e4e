"""Eval suites: prompt construction, needle placement, scoring, determinism, reports and bad input."""

import json

import pytest
from llmpatch.evals import haystack as hs
from llmpatch.evals.recipes import load_recipe
from llmpatch.evals.runner import check_lengths, markdown_table, write_report
from llmpatch.evals.suites import SUITES, Sample, first_number, get_suite

from llmpatch.errors import ParameterError
from llmpatch.meta import run_metadata


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def test_insert_at_depth_picks_the_nearest_sentence_end():
    sentences = ["a.", "b.", "c.", "d."]
    lengths = [10, 10, 40, 40]  # ends at 0, 10, 20, 60, 100
    for depth, at in [(0.0, 0), (0.1, 1), (0.16, 2), (0.39, 2), (0.41, 3), (1.0, 4)]:
        out, idx = hs.insert_at_depth(sentences, lengths, "N.", depth)
        assert idx == at and out[idx] == "N." and len(out) == 5
    with pytest.raises(ParameterError, match="depth: must be between 0 and 1"):
        hs.insert_at_depth(sentences, lengths, "N.", 1.5)


@pytest.mark.parametrize("name", list(SUITES))
@pytest.mark.parametrize("length", [300, 1024])
def test_prompts_fit_the_budget_and_are_deterministic(tok, name, length):
    suite = SUITES[name]
    a = suite.sample(tok, length, 3, seed=7, depth=0.5 if suite.grid_depths else None)
    b = suite.sample(tok, length, 3, seed=7, depth=0.5 if suite.grid_depths else None)
    # the mix's samples are fixed by (split, index): the seed does not apply
    other = 4 if name == "mix" else 3
    c = suite.sample(tok, length, other, seed=8, depth=0.5 if suite.grid_depths else None)
    assert a == b and a.prompt != c.prompt
    assert 0.85 * length <= a.n_tokens <= length
    # the mix tokenizes context and question apart (protocol B's split); whole, the seam can merge differently
    assert a.n_tokens == len(a.prompt_ids or tok(a.prompt, add_special_tokens=False).input_ids)
    assert a.prompt.startswith("<|im_start|>")  # SmolLM2's chat template
    for answer in a.answers:
        assert answer in a.text  # every expected answer is present in the haystack


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_niah_needle_sits_at_the_requested_depth_within_one_sentence(tok, depth):
    s = SUITES["niah"].sample(tok, 1024, 0, depth=depth)
    intro, body, _ = s.text.split("\n\n")
    sentences = hs.split_sentences(body)
    idx = next(i for i, x in enumerate(sentences) if x.startswith("The best thing to do in"))
    lengths = [len(tok(x, add_special_tokens=False).input_ids) + 1 for x in sentences]
    before, total = sum(lengths[:idx]), sum(lengths) - lengths[idx]
    longest = max(lengths)
    assert abs(before - depth * total) <= longest  # within one sentence of the target
    assert sentences[idx - 1].endswith((".", "!", "?")) if idx else True


def test_scoring():
    passkey, niah, multi, vt = (
        SUITES["passkey"],
        SUITES["niah"],
        SUITES["ruler_niah_multivalue"],
        SUITES["ruler_vt"],
    )

    def sample(answers):
        return Sample("x", 100, 0, "", "", answers, 90)

    assert passkey.score(sample(["4321"]), "The pass key is 4321.") == 1.0
    assert passkey.score(sample(["4321"]), "It is 1234, not 4321") == 0.0  # the first number counts
    assert passkey.score(sample(["4321"]), "no idea") == 0.0
    assert niah.score(sample(["eat a warm pretzel"]), "You should Eat a WARM pretzel!") == 1.0
    assert niah.score(sample(["eat a warm pretzel"]), "eat a sandwich") == 0.5
    assert multi.score(sample(["111", "222", "333", "444"]), "111 and 333") == 0.5
    assert vt.score(sample(["ABCDE", "FGHJK"]), "ABCDE") == 0.5
    assert first_number("x 12 y 34") == "12" and first_number("none") is None


def test_user_haystack_and_errors(tok, tmp_path):
    text = tmp_path / "hay.txt"
    text.write_text("Alpha beta gamma. Delta epsilon zeta! Eta theta iota? Kappa lambda mu.")
    hay = hs.Haystack(text)
    s = SUITES["niah"].sample(tok, 300, 0, depth=0.5, haystack=hay)
    assert "Alpha beta gamma." in s.text and "The best thing" in s.text
    with pytest.raises(ParameterError, match=r"haystack: file '.*missing.txt' does not exist"):
        hs.Haystack(tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("only one sentence")
    with pytest.raises(ParameterError, match="fewer than two sentences"):
        hs.Haystack(tmp_path / "one.txt")


def test_mix_suite_gives_bench_accuracys_protocol_a_outputs(smollm2, tmp_path):
    """The held-out mix as an eval suite: the test split's samples, their own token ids and answer budgets, so a
    recipe's mix cell is `llmpatch bench accuracy`'s protocol A on the same samples."""
    from llmpatch.evals.accuracy import run_sample
    from llmpatch.evals.mix import make_sample
    from llmpatch.evals.runner import run_suite

    model, tok = smollm2
    families = ["niah_number", "multivalue"]
    result = run_suite(model, tok, get_suite("mix", families), lengths=[512], samples=2, logprob=False)
    (dense,) = result["configs"]
    assert result["families"] == families
    for i, rec in enumerate(dense["samples"]):
        want = run_sample(model, tok, make_sample(tok, "test", i, 512, families), "A")
        assert rec["meta"]["family"] == families[i] and rec["meta"]["seed"] == want["seed"]
        assert rec["output"] == want["output"] and rec["score"] == want["score"]
        assert rec["prompt_tokens"] == want["n_tokens"] and rec["new_tokens"] == want["new_tokens"]
    assert "prompt_ids" not in dense["samples"][0]
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: smollm2-135m\nsuites: {{mix: {{lengths: [1024], samples: 3, families: {families}}}}}\n"
    )
    (spec,) = load_recipe(path).suites
    assert spec.families == families and get_suite(spec.name, spec.families).families == families


def test_unknown_suite_and_too_long(smollm2):
    with pytest.raises(
        ParameterError, match=r"suite: unknown suite 'needle'; available: passkey, niah, ruler_niah_single"
    ):
        get_suite("needle")
    with pytest.raises(
        ParameterError, match=r"lengths: 10000 tokens exceeds the model's context of 8192 tokens"
    ):
        check_lengths(smollm2[0], [1024, 10000])
    with pytest.raises(ParameterError, match="length: 20 tokens cannot hold even the question"):
        SUITES["passkey"].sample(smollm2[1], 20, 0)


def test_metadata_names_uncommitted_code(tmp_path):
    """A run on code that differs from its commit lists the changed code files (llmpatch/, kernels/), not others."""
    import importlib.util
    import shutil
    import subprocess

    from llmpatch import meta

    repo = tmp_path / "repo"
    for d in ("llmpatch", "kernels"):
        (repo / d).mkdir(parents=True)
    shutil.copy(meta.__file__, repo / "llmpatch" / "meta.py")
    (repo / "kernels" / "k.py").write_text("x = 1\n")
    (repo / "RESULTS.md").write_text("a\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    spec = importlib.util.spec_from_file_location("meta_copy", repo / "llmpatch" / "meta.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.git_modified() == []
    (repo / "kernels" / "k.py").write_text("x = 2\n")
    (repo / "RESULTS.md").write_text("b\n")
    assert copy.git_modified() == ["kernels/k.py"]
    assert len(copy.git_commit()) == 40


def test_metadata_and_report(tmp_path):
    meta = run_metadata(arguments={"x": 1})
    assert {"llmpatch", "git_commit", "git_modified", "torch", "transformers", "python", "device", "argv",
            "time"} <= set(meta)  # fmt: skip
    cell = dict(n=1, accuracy=1.0, prompt_tokens=100, ttft_s=0.1, prefill_s=0.1, decode_tokens_per_s=10.0,
                peak_memory_mb=100.0, answer_logprob=-1.0, density=1.0)  # fmt: skip
    result = {
        "suite": "niah", "lengths": [100, 200], "depths": [0.0, 1.0], "samples_per_cell": 1, "seed": 0,
        "haystack": "generated",
        "configs": [{"label": "dense", "methods": None, "params": {}, "plan": None, "samples": [],
                     "cells": [dict(cell, length=n, depth=d) for n in (100, 200) for d in (0.0, 1.0)]}],
    }  # fmt: skip
    payload = write_report([result], tmp_path, model="m", extra_meta={"recipe": {"a": 1}})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["metadata"]["recipe"] == {"a": 1} and data["summary"][0]["accuracy"] == 1.0
    assert (tmp_path / "niah_heatmap_dense.png").stat().st_size > 1000
    assert (tmp_path / "niah_accuracy.png").exists() and "niah_heatmap_dense.png" in payload["files"]
    assert "| niah | dense | 100 | 2 | 1.000 |" in markdown_table(data["summary"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("model: m\nsuites: {passkey: {lengths: [1024]}}\nsamplez: 3\n", r"key 'samplez' is not a recipe key"),
        ("suites: {passkey: {lengths: [1024]}}\n", r"key 'model' is missing"),
        ("model: m\nsuites: {needle: {lengths: [1024]}}\n", r"key 'suites.needle' names an unknown suite"),
        ("model: m\nsuites: {passkey: {}}\n", r"key 'suites.passkey.lengths' is missing"),
        ("model: m\nsuites: {passkey: {lengths: 1024}}\n", r"'suites.passkey.lengths' must be a non-empty list"),
        ("model: m\nsuites: {niah: {lengths: [512], depths: [2]}}\n", r"'suites.niah.depths' must be a list of numbers"),
        ("model: m\nsuites: {passkey: {lengths: [512]}}\nmethods: [{params: {}}]\n", r"'methods\[0\]' must be a mapping with at least 'method'"),
        ("model: m\nsuites: {passkey: {lengths: [512]}}\nmethods: [{method: dense, label: dense}]\n", r"'methods\[0\].label' 'dense' is taken"),
        ("model: [\n", r"not valid YAML"),
        ("model: m\nsuites: {passkey: {lengths: [512]}}\nmethods: [{method: moe}]\n", r"'methods\[0\]' method: unknown method 'moe'"),
        ("model: m\nsuites: {passkey: {lengths: [512]}}\nmethods: [{method: sink_window, params: {window: -1}}]\n",
         r"'methods\[0\]' sink_window: parameter 'window' must be an int >= 1"),
        ("model: m\nsuites: {passkey: {lengths: [512]}}\nmethods: [{method: moa, plan: nope.json}]\n",
         r"'methods\[0\]' plan: file 'nope.json' does not exist"),
        ("model: m\nsuites: {passkey: {lengths: [512], families: [vt]}}\n",
         r"'suites.passkey.families' only the mix suite takes families, not 'passkey'"),
        ("model: m\nsuites: {mix: {lengths: [512], families: [vt, needle]}}\n",
         r"'suites.mix.families' must be a non-empty list of mix families \(niah_number, .*\), got \['vt', 'needle'\]"),
    ],
)  # fmt: skip
def test_malformed_recipes_name_the_key(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ParameterError, match=match):
        load_recipe(path)


def test_shipped_recipes_load():
    from pathlib import Path

    from llmpatch.evals import accuracy

    for path in sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml")):
        if accuracy.is_mix_recipe(path):  # `llmpatch bench accuracy` (or `llmpatch eval`) runs these
            mix = accuracy.load(path)
            assert mix.points[0].label == "dense" and len(mix.points) > 1
            for point in mix.points[1:]:
                assert point.plan is None or Path(point.plan).is_file(), point.plan
            continue
        recipe = load_recipe(path)
        assert recipe.configs[0].label == "dense" and recipe.suites
