"""data.streaming: a seeded stream order, positions read in any order, exact resume."""

import pytest

import forgetless
from forgetless.config import DataConfig, DatasetSpec
from forgetless.data.formats import Encoder
from forgetless.data.stream import ExampleStream
from forgetless.errors import ConfigError
from forgetless.models.tiny import load_tiny_tokenizer
from tests.conftest import PC_RECORDS, fast_overrides, write_jsonl


@pytest.fixture
def stream_file(tmp_path):
    return write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)  # 24 records


def stream(path, seed=0, buffer=8):
    return ExampleStream(Encoder(load_tiny_tokenizer(), DataConfig()), [DatasetSpec(path=str(path))], seed, buffer)


def key(examples):
    return [tuple(e.input_ids) for e in examples]


def test_the_order_is_a_function_of_the_seed_and_positions_can_be_read_in_any_order(stream_file):
    a, b = stream(stream_file), stream(stream_file)
    first = key(a.take(0, 60))  # 2.5 epochs of 24
    assert first == key(b.take(0, 60))
    assert first != key(stream(stream_file, seed=1).take(0, 60))
    assert sorted(first[:24]) == sorted(first[24:48])  # every epoch is every record once
    assert first[:24] != first[24:48]  # in another order (seed + epoch)
    c = stream(stream_file)
    assert key(c.take(30, 40)) == first[30:40]  # a resumed stream skips to its position
    assert key(c.take(5, 9)) == first[5:9]  # and can go back (read again from the start)
    assert key(c.head(4)) == first[:4] and c.stats.records == 24 and c.stats.kept == 24


def test_streaming_needs_max_steps_and_no_holdout(stream_file, tmp_path):
    with pytest.raises(ConfigError, match="data.streaming: a stream has no known length"):
        forgetless.load_config(None, [f"data.train={stream_file}", "data.streaming=true", f"output.dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="cannot hold records out"):
        forgetless.load_config(None, [f"data.train={stream_file}", "data.streaming=true", "train.max_steps=2", "data.eval_holdout=2"])


@pytest.mark.slow
def test_a_streamed_run_killed_and_resumed_is_the_uninterrupted_one(tmp_path, stream_file):
    from tests.resume.conftest import assert_same_run, killed_process, resume, train

    train(tmp_path / "whole", stream_file, "data.streaming=true", "data.stream_buffer=4")
    out = tmp_path / "killed"
    assert killed_process(out, stream_file, "step:5", "data.streaming=true", "data.stream_buffer=4") == 137
    resume(out, stream_file, "data.streaming=true", "data.stream_buffer=4")
    assert_same_run(tmp_path / "whole", out)
    # the stream is not the in-memory order, but trains on the same data
    cfg = forgetless.load_config(None, fast_overrides(tmp_path / "mem", stream_file, "train.max_steps=8"))
    assert forgetless.train(cfg).train["tokens"] > 0
