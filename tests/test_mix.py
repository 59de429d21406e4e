"""The held-out mix: disjoint dev / test splits (seeds and haystack passages), prompts split at the question,
deterministic samples, scoring, and `bench accuracy` end to end (resume, both protocols, report)."""

import json

import pytest
from llmpatch.evals import accuracy, haystacks, mix

from llmpatch.errors import ParameterError


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def samples(tok):
    return {split: mix.make_samples(tok, split, 20, 512) for split in ("dev", "test")}


def test_passage_split_is_disjoint_and_covers_every_source():
    dev, test = haystacks.split_passages("dev"), haystacks.split_passages("test")
    assert not {p.key for p in dev} & {p.key for p in test}
    assert {p.key for p in dev} | {p.key for p in test} == {p.key for p in haystacks.passages()}
    for source in haystacks.SOURCES:  # every source has prose in both splits
        assert haystacks.split_passages("dev", source) and haystacks.split_passages("test", source)
    sentences = {s for p in test for s in p.sentences}
    assert len(sentences) > 500 and all(len(s.split()) >= haystacks.MIN_WORDS for s in sentences)


def test_dev_and_test_share_no_seed_and_no_passage(samples):
    dev, test = samples["dev"], samples["test"]
    assert not {s.seed for s in dev} & {s.seed for s in test}
    assert not {k for s in dev for k in s.passages} & {k for s in test for k in s.passages}
    for split, group in samples.items():
        allowed = {p.key for p in haystacks.split_passages(split)}
        assert all(set(s.passages) <= allowed and s.split == split for s in group)
    # no test sentence appears in a dev prompt
    test_sentences = {x for p in haystacks.split_passages("test") for x in p.sentences}
    assert not any(x in s.context for s in dev for x in test_sentences if len(x) > 60)
    assert max(mix.SEED_BASE["dev"] + mix.MAX_SAMPLES - 1, 0) < mix.SEED_BASE["test"]


def test_samples_are_deterministic_fit_and_hold_their_needles(tok, samples):
    again = mix.make_samples(tok, "dev", 20, 512)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples["dev"]]
    assert {s.family for s in samples["dev"]} == set(mix.FAMILIES)
    for s in samples["dev"] + samples["test"]:
        assert 0.8 * 512 <= s.n_tokens <= 512
        assert tok.decode(s.question_ids).startswith(s.question[:20])
        assert all(a in s.context for a in s.answers)  # the answer is in the context, never in the question
        assert not any(a in s.question for a in s.answers)
        assert len(haystacks.split_passages(s.split, s.source)) > 0


def test_score_is_the_fraction_of_expected_strings():
    assert mix.score(["123", "456"], "it is 123 and 999") == 0.5
    assert mix.score(["Wren"], "the wren.") == 1.0
    with pytest.raises(ParameterError, match="split"):
        mix.make_sample(None, "train", 0, 512)
    with pytest.raises(ParameterError, match="families"):
        mix.make_sample(None, "dev", 0, 512, families=["nope"])


def test_bench_accuracy_runs_both_protocols_resumes_and_reports(smollm2, tmp_path):
    model, tok = smollm2
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: smollm2-135m\nmix: {split: dev, samples: 2, length: 320, families: [niah_number, qa]}\n"
        "methods:\n  - {label: streamingllm-50, method: streamingllm, params: {density: 0.5, sink: 16, tail: 8},"
        " protocols: [A, B]}\n"
    )
    r = accuracy.load(path)
    out = tmp_path / "out"
    accuracy.run(model, tok, r, out)
    files = {p.name for p in out.glob("*.jsonl")}
    assert files == {
        "dense.A.jsonl",
        "streamingllm-50.A.jsonl",
        "streamingllm-50.B.jsonl",
        "samples.dev.jsonl",
    }
    before = (out / "streamingllm-50.B.jsonl").read_text()
    accuracy.run(model, tok, r, out)  # resumes: nothing to do
    assert (out / "streamingllm-50.B.jsonl").read_text() == before
    with (out / "streamingllm-50.B.jsonl").open("a") as f:  # a sample written twice counts once
        f.write(before.splitlines()[0] + "\n")
    rows = {(x["label"], x["protocol"]): x for x in accuracy.summarize(out)}
    assert rows[("dense", "A")]["kv_saved"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("dense", "A")]["prefill_computed"] == 1.0
    for proto in "AB":
        row = rows[("streamingllm-50", proto)]
        assert row["n"] == 2 and 0.3 < row["kv_saved"] < 0.7 and row["prefill_computed"] < 0.9
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    files = accuracy.report(out, title="t")
    assert "summary.md" in files
    meta = json.loads((out / "streamingllm-50.A.meta.json").read_text())
    assert meta["protocol"] == "A" and meta["params"]["tail"] == 8


def test_table_groups_by_target_best_first_and_marks_nominal_figures():
    def row(label, proto, acc, saved, nominal=False):
        return {"label": label, "protocol": proto, "n": 30, "accuracy": acc, "ci95": [acc, acc],
                "kv_saved": saved, "prefill_computed": 1.0, "seconds": 1.0, "toolkit": "t",
                "by_family": {"niah_number": acc}, "nominal": nominal}  # fmt: skip

    rows = [row("a-67", "A", 0.2, 0.70), row("kvpress-b-67", "A", 0.9, 0.62, True), row("c-50", "A", 0.5, 0.55),
            row("dense", "A", 1.0, 0.0), row("a-67", "B", 0.1, 0.69), row("d-67", "A", 0.3, 0.19)]  # fmt: skip
    lines = accuracy.markdown(rows).splitlines()[2:]
    assert [x.split(" | ")[1] for x in lines] == ["dense", "d-67", "c-50", "kvpress-b-67", "a-67", "a-67"]
    assert "62.0%*" in lines[3] and "70.0% |" in lines[4]


def test_bad_recipes_name_the_key(tmp_path):
    cases = {
        "model: m\nmix: {split: train}\n": "mix.split",
        "model: m\nmix: {samples: 0}\n": "mix.samples",
        "model: m\nmix: {families: [bogus]}\n": "mix.families",
        "model: m\nmix: {}\nmethods: [{method: moa, protocols: [C]}]\n": "protocols",
        "model: m\nmix: {}\nextra: 1\n": "extra",
    }
    for text, key in cases.items():
        p = tmp_path / "r.yaml"
        p.write_text(text)
        with pytest.raises(ParameterError, match=key):
            accuracy.load(p)


def test_interval_brackets_the_mean():
    lo, hi = accuracy.interval([0.0] * 10 + [1.0] * 20)
    assert lo < 2 / 3 < hi and 0.4 < lo and hi < 0.9
