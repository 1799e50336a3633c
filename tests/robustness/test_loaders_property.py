"""Property-based tests: whatever is thrown at the loaders and the encoder, the result is either
valid examples or a DataError / UserError that names the file -- never another exception.

Records are random JSON (unicode with unpaired surrogates, nesting, numbers where text belongs,
near misses of the three formats) written to real files; files are also random bytes under
every supported extension. Deterministic (``derandomize=True``) and quick.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgetless.config import DataConfig, DatasetSpec
from forgetless.data.batching import collate
from forgetless.data.formats import IGNORE, ROLES, Encoder
from forgetless.data.loading import load_records
from forgetless.errors import UserError
from forgetless.models.tiny import load_tiny_tokenizer

TOK = load_tiny_tokenizer()
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def mostly(usual: st.SearchStrategy, *odd: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` four times out of five or so, else one of ``odd``: most records get far enough
    to be tokenized, the rest probe the validation."""
    return st.sampled_from([usual] * 4 + [st.one_of(*odd)]).flatmap(lambda s: s)  # one_of would merge the copies


# Any code point, surrogates included (JSON writes them as \udXXX escapes, which load back as
# unpaired surrogates: valid JSON, invalid Unicode).
any_char = st.characters(exclude_categories=())
with_surrogate = st.builds(lambda a, s, b: a + s + b, st.text(max_size=6), st.characters(categories=["Cs"]), st.text(max_size=6))
text = mostly(
    st.text(min_size=1, max_size=40),
    st.text(any_char, max_size=12), with_surrogate, st.sampled_from(["", " ", "\n", "<|im_end|>", "<|endoftext|>"]),
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), text)
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=10)
field_value = mostly(text, json_value)
role = mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["Assistant", "asistant", " user", "human", "", "tool"]), text, json_value)
message = mostly(st.fixed_dictionaries({"role": role, "content": field_value}), json_value)
messages = mostly(st.lists(message, min_size=1, max_size=4), json_value)
choices = mostly(st.lists(text, min_size=2, max_size=4), json_value)
answer = mostly(st.integers(0, 1), st.integers(-1, 4), text, json_value)
extra = st.dictionaries(st.sampled_from(["id", "meta", "text", "prompt", "source", "choices"]), json_value, max_size=2)


def with_extra(fields: dict) -> st.SearchStrategy:
    """A record of ``fields``, sometimes with a few more keys of any value."""
    return st.builds(lambda d, e: {**e, **d}, st.fixed_dictionaries(fields), st.one_of(st.just({}), extra))


conversation = st.builds(  # ends with an assistant turn, so it often gets as far as the template
    lambda head, last: head + [last], st.lists(message, max_size=3), st.fixed_dictionaries({"role": st.just("assistant"), "content": field_value})
)
KINDS = {
    "text": with_extra({"text": field_value}),
    "prompt_completion": with_extra({"prompt": field_value, "completion": field_value}),
    "messages": with_extra({"messages": mostly(conversation, messages)}),
    "multiple_choice": st.fixed_dictionaries({"question": field_value, "choices": choices, "answer": answer}),
    "anything": st.one_of(st.fixed_dictionaries({}, optional={"prompt": field_value, "completion": field_value}), json_value),
}
record = st.one_of(*KINDS.values())
requested_format = mostly(st.just("auto"), st.sampled_from(["text", "prompt_completion", "messages", "multiple_choice"]))

data_config = st.builds(
    DataConfig,
    max_length=st.integers(2, 64),
    truncation=st.sampled_from(["truncate", "drop"]),
    completion_only_loss=st.booleans(),
    chat_template=st.sampled_from([None, "chatml"]),
)


def check_examples(examples, cfg: DataConfig) -> None:
    """The invariants of every encoded example."""
    for ex in examples:
        n = len(ex.input_ids)
        assert 0 < n <= cfg.max_length and len(ex.labels) == n
        assert all(isinstance(t, int) and 0 <= t < len(TOK) for t in ex.input_ids)
        # a label is either masked or the token at its own position: no shifted or foreign targets
        assert all(lab == IGNORE or lab == tok for lab, tok in zip(ex.labels, ex.input_ids))
        assert ex.num_targets > 0
        if ex.prompt_ids is not None:
            assert len(ex.prompt_ids) < cfg.max_length
        batch = collate([ex], TOK.pad_token_id)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (1, n)


def check_prompt_completion(ex, cfg: DataConfig) -> None:
    """The prompt is the start of the sequence and carries no loss when completion_only_loss."""
    k = len(ex.prompt_ids)
    assert ex.input_ids[:k] == ex.prompt_ids
    if cfg.completion_only_loss:
        assert all(lab == IGNORE for lab in ex.labels[:k])


def load_and_encode(path: Path, cfg: DataConfig, fmt: str = "auto"):
    """Examples, or the UserError it raised (which must name the file)."""
    try:
        recs = load_records(DatasetSpec(path=str(path), format=fmt))
        assert recs and all(isinstance(r.data, dict) and str(path) in r.where for r in recs)
        return Encoder(TOK, cfg).encode_all(recs, fmt)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return e


@pytest.mark.parametrize("kind", KINDS)
@PROPERTY
@given(data=st.data())
def test_random_jsonl_records_load_and_encode_or_fail_cleanly(kind, data):
    """Mostly records of one kind (each kind gets its own 100 draws), mixed with any other."""
    recs = data.draw(st.lists(mostly(KINDS[kind], record), min_size=1, max_size=3), label="records")
    cfg, fmt = data.draw(data_config, label="data config"), data.draw(requested_format, label="format")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
        out = load_and_encode(path, cfg, fmt)
        if isinstance(out, UserError):
            return
        examples, stats = out
        assert stats.records == len(recs) and stats.kept == len(examples)
        assert stats.kept + stats.dropped_too_long + stats.dropped_no_target == stats.records
        check_examples(examples, cfg)
        for ex in examples:
            rec = recs[int(ex.where.rsplit(":", 1)[1]) - 1]  # where = "file:line", one record per line
            if stats.formats.get("prompt_completion") and ex.prompt_ids is not None and "prompt" in rec and "completion" in rec \
                    and "messages" not in rec and ("choices" not in rec or fmt == "prompt_completion"):
                check_prompt_completion(ex, cfg)


@PROPERTY
@given(st.lists(record, min_size=0, max_size=4), data_config)
def test_random_json_documents_load_and_encode_or_fail_cleanly(recs, cfg):
    """The same records as one .json document: a list, a {"data": [...]} wrapper, or columns."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.json"
        path.write_text(json.dumps(recs if len(recs) % 2 else {"data": recs}), encoding="utf-8")
        out = load_and_encode(path, cfg)
        if not isinstance(out, UserError):
            check_examples(out[0], cfg)


@PROPERTY
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".txt"]), data_config)
def test_random_bytes_never_crash_the_text_loaders(content, suffix, cfg):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        out = load_and_encode(path, cfg)
        if not isinstance(out, UserError):
            check_examples(out[0], cfg)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120), st.sampled_from([".csv", ".parquet"]))
def test_random_bytes_never_crash_the_tabular_loaders(content, suffix):
    """Fewer examples: every call goes through ``datasets`` (a few hundred ms)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        out = load_and_encode(path, DataConfig(max_length=32))
        if not isinstance(out, UserError):
            check_examples(out[0], DataConfig(max_length=32))
