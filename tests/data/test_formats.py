import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgetless.config import DataConfig
from forgetless.data.formats import IGNORE, Encoder, detect_format
from forgetless.data.loading import Record
from forgetless.errors import DataError
from forgetless.models.tiny import load_tiny_tokenizer

TOK = load_tiny_tokenizer()


def enc(**kw) -> Encoder:
    return Encoder(TOK, DataConfig(**kw))


def targets_text(ex) -> str:
    return TOK.decode([t for t in ex.labels if t != IGNORE])


def test_detects_the_three_formats():
    assert detect_format(Record({"text": "x"}, "r")) == "text"
    assert detect_format(Record({"prompt": "x", "completion": "y"}, "r")) == "prompt_completion"
    assert detect_format(Record({"messages": [{"role": "assistant", "content": "y"}]}, "r")) == "messages"


def test_prompt_completion_loss_only_on_completion():
    ex = enc().encode(Record({"prompt": "The capital of France is", "completion": " Paris"}, "r"), "prompt_completion")
    assert targets_text(ex) == " Paris<|endoftext|>"
    assert TOK.decode(ex.prompt_ids) == "The capital of France is"
    assert ex.reference == " Paris"
    # with completion_only_loss off, the prompt is trained too
    ex = enc(completion_only_loss=False).encode(Record({"prompt": "A", "completion": " B"}, "r"), "prompt_completion")
    assert all(t != IGNORE for t in ex.labels)


def test_text_trains_every_token():
    ex = enc().encode(Record({"text": "hello world"}, "r"), "text")
    assert ex.labels == ex.input_ids
    assert TOK.decode(ex.input_ids) == "hello world<|endoftext|>"


def test_messages_loss_only_on_assistant_turns():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    ex = enc().encode(Record({"messages": msgs}, "r"), "messages")
    assert targets_text(ex) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    assert TOK.decode(ex.prompt_ids).endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert ex.reference == "Goodbye."
    # the full sequence is the rendered chat template
    assert TOK.decode(ex.input_ids) == TOK.apply_chat_template(msgs, tokenize=False)


def test_messages_without_chat_template_is_a_clear_error():
    tok = load_tiny_tokenizer()
    tok.chat_template = None
    e = Encoder(tok, DataConfig())
    rec = Record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "f.jsonl:3")
    with pytest.raises(DataError, match=r"f.jsonl:3: 'messages' data needs a chat template.*data.chat_template=chatml"):
        e.encode(rec, "messages")
    ex = Encoder(tok, DataConfig(chat_template="chatml")).encode(rec, "messages")
    assert targets_text(ex) == "b<|im_end|>\n"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"question": "x", "answer": "y"}, r"f.jsonl:7: the record has none of the fields 'text'.*found 'question', 'answer'"),
        ({"prompt": "x", "completion": ""}, r"f.jsonl:7: field 'completion' is empty"),
        ({"prompt": "x", "completion": 3}, r"field 'completion' must be a string"),
        ({"text": ""}, r"field 'text' is empty"),
        ({"messages": []}, r"must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"no 'assistant' message"),
    ],
)
def test_bad_records(data, message):
    with pytest.raises(DataError, match=message):
        detect_format(Record(data, "f.jsonl:7"))


def test_truncation_and_drop_are_counted():
    long = Record({"prompt": "word " * 40, "completion": " end"}, "r")
    short = Record({"prompt": "a", "completion": " b"}, "r")
    text = Record({"text": "word " * 40}, "r")
    exs, stats = enc(max_length=16).encode_all([long, short, text])
    # the long prompt/completion loses its whole completion: dropped; the text is cut to 16 tokens
    assert stats.truncated == 2 and stats.dropped_no_target == 1 and stats.kept == 2
    assert all(len(e.input_ids) <= 16 for e in exs)
    exs, stats = enc(max_length=16, truncation="drop").encode_all([long, short, text])
    assert stats.dropped_too_long == 2 and stats.kept == 1


_text = st.text(min_size=0, max_size=40)
_record = st.one_of(
    st.fixed_dictionaries({"text": _text}),
    st.fixed_dictionaries({"prompt": _text, "completion": _text}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": _text}), max_size=4)}),
    st.dictionaries(st.text(max_size=8), st.one_of(_text, st.integers(), st.none()), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(_record)
def test_random_records_encode_or_fail_cleanly(data):
    """Any record either encodes into aligned ids/labels or raises a DataError naming it."""
    rec = Record(data, "f.jsonl:1")
    try:
        exs, stats = enc(max_length=32).encode_all([rec])
    except DataError as e:
        assert str(e).startswith("f.jsonl:1")
        return
    for ex in exs:
        assert len(ex.input_ids) == len(ex.labels) <= 32
        assert ex.num_targets > 0
        assert all(lab == IGNORE or lab == tok for lab, tok in zip(ex.labels, ex.input_ids))
