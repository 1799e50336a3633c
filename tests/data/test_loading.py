import json

import pytest

from forgetless.config import DatasetSpec
from forgetless.data.loading import load_records
from forgetless.errors import DataError

RECS = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]


def test_jsonl_keeps_line_numbers_and_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(RECS[0]) + "\n\n" + json.dumps(RECS[1]) + "\n")
    recs = load_records(DatasetSpec(path=str(p)))
    assert [r.data for r in recs] == RECS
    assert [r.where for r in recs] == [f"{p}:1", f"{p}:3"]


def test_json_list_and_columns(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(RECS))
    assert [r.data for r in load_records(DatasetSpec(path=str(p)))] == RECS
    p.write_text(json.dumps({"prompt": ["a", "c"], "completion": [" b", " d"]}))
    assert [r.data for r in load_records(DatasetSpec(path=str(p)))] == RECS


def test_csv_and_parquet(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list(RECS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.csv", "d.parquet"):
        recs = load_records(DatasetSpec(path=str(tmp_path / name)))
        assert [r.data for r in recs] == RECS
    assert load_records(DatasetSpec(path=str(tmp_path / "d.csv")))[0].where.endswith("d.csv:2")


def test_txt_paragraphs(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("first para\nsecond line\n\n\nnext para\n")
    recs = load_records(DatasetSpec(path=str(p)))
    assert [r.data["text"] for r in recs] == ["first para\nsecond line", "next para"]
    assert recs[1].where == f"{p}:5"


def test_limit_and_demo_sets():
    recs = load_records(DatasetSpec(path="demo:capitals", limit=3))
    assert len(recs) == 3 and recs[0].data["prompt"].startswith("The capital of")
    assert len(load_records(DatasetSpec(path="demo:elements"))) == 86


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": broken}\n', r"d.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n\xff\xfe\n', r"d.jsonl:2: not valid UTF-8"),
        (b'["a list"]\n', r"d.jsonl:1: expected a JSON object"),
        (b"\n\n", r"the dataset is empty"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_records(DatasetSpec(path=str(p)))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(DatasetSpec(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type .xml"):
        load_records(DatasetSpec(path=str(tmp_path / "d.xml")))
    with pytest.raises(DataError, match="no such shipped dataset"):
        load_records(DatasetSpec(path="demo:nothing"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="loading it as a hub dataset failed"):
        load_records(DatasetSpec(path="someone/not-a-real-dataset-xyz"))
