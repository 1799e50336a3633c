"""Large data: tokenized through datasets (Arrow, several processes, cached), the same examples and runs as in memory."""

import json

import pytest

import forgetless.data.arrow as arrow
from forgetless.config import DataConfig, DatasetSpec
from forgetless.data.arrow import encode_to_table, wants_arrow
from forgetless.data.encoding import encode_dataset
from forgetless.data.formats import Encoder
from forgetless.errors import DataError
from forgetless.models.tiny import load_tiny_tokenizer
from tests.conftest import CHAT_RECORDS, PC_RECORDS, TEXT_RECORDS, write_jsonl

FIELDS = ("input_ids", "labels", "prompt_ids", "reference", "choices", "choice_chars", "answer", "eos_appended", "where")


@pytest.fixture
def mixed(tmp_path):
    mcq = [{"question": f"{i} + 1?", "choices": [str(i + 1), str(i + 2)], "answer": 0} for i in range(5)]
    sharegpt = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]} for i in range(4)]
    long_text = [{"text": "word " * 200}]  # truncated at max_length
    return write_jsonl(tmp_path / "mixed.jsonl", PC_RECORDS[:7] + CHAT_RECORDS[:5] + TEXT_RECORDS[:5] + mcq + sharegpt + long_text)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_arrow_path_gives_the_examples_of_the_list_path(tmp_path, mixed, num_proc):
    enc = Encoder(load_tiny_tokenizer(), DataConfig(max_length=48))
    specs = [DatasetSpec(path=str(mixed)), DatasetSpec(path="demo:capitals", limit=9)]
    listed, stats = encode_dataset(enc, specs)
    table, table_stats = encode_to_table(enc, specs, num_proc=num_proc, root=tmp_path / "cache")
    assert len(table) == len(listed) == 36 and vars(table_stats) == vars(stats)
    assert stats.truncated == 1 and stats.formats == {"prompt_completion": 16, "messages": 9, "text": 6, "multiple_choice": 5}
    for a, b in zip(listed, table):
        assert {k: getattr(a, k) for k in FIELDS} == {k: getattr(b, k) for k in FIELDS}
    assert [e.input_ids for e in table[3:6]] == [e.input_ids for e in listed[3:6]]


def test_the_cache_is_reused_and_keyed_by_data_and_tokenizer_options(tmp_path, mixed, monkeypatch):
    tok = load_tiny_tokenizer()
    spec = DatasetSpec(path=str(mixed))
    root = tmp_path / "cache"
    first, _ = encode_to_table(Encoder(tok, DataConfig(max_length=48)), [spec], root=root)

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(arrow, "_encode_batch", fail)
    again, _ = encode_to_table(Encoder(tok, DataConfig(max_length=48)), [spec], root=root)  # from the cache
    assert again.fingerprint == first.fingerprint and len(list(root.iterdir())) == 1
    monkeypatch.undo()
    other, _ = encode_to_table(Encoder(tok, DataConfig(max_length=32)), [spec], root=root)  # another option: tokenized anew
    assert len(list(root.iterdir())) == 2 and other.fingerprint != first.fingerprint


def test_bad_records_name_their_line(tmp_path):
    enc = Encoder(load_tiny_tokenizer(), DataConfig())
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(PC_RECORDS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: malformed JSON"):
        encode_to_table(enc, [DatasetSpec(path=str(broken))], root=tmp_path / "c")
    odd = write_jsonl(tmp_path / "odd.jsonl", [PC_RECORDS[0], {"question": "x"}])
    with pytest.raises(DataError, match=r"odd.jsonl:2: the record has none of the fields"):
        encode_to_table(enc, [DatasetSpec(path=str(odd))], root=tmp_path / "c", num_proc=2)
    assert not any(p.name.startswith(".") for p in (tmp_path / "c").iterdir())  # no half-written cache left


def test_when_the_arrow_path_is_taken(tmp_path, mixed):
    specs = [DatasetSpec(path=str(mixed))]
    assert not wants_arrow(specs, DataConfig())
    assert wants_arrow(specs, DataConfig(num_proc=2))
    assert wants_arrow(specs, DataConfig(arrow_min_mb=mixed.stat().st_size / 2**20))


@pytest.mark.slow
def test_a_run_on_the_arrow_path_is_the_run_in_memory_and_resumes_exactly(tmp_path, monkeypatch):
    from tests.resume.conftest import assert_same_run, killed_process, resume, train

    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)
    train(tmp_path / "memory", data)
    train(tmp_path / "arrow", data, "data.num_proc=2", "data.eval_holdout=4")
    train(tmp_path / "memory-holdout", data, "data.eval_holdout=4")
    assert_same_run(tmp_path / "memory-holdout", tmp_path / "arrow")
    assert (tmp_path / "cache" / "tokenized").is_dir()
    out = tmp_path / "killed"
    assert killed_process(out, data, "step:5", "data.num_proc=2") == 137
    resume(out, data, "data.num_proc=2")
    assert_same_run(tmp_path / "memory", out)
