"""Chat data on the real chat templates of Qwen3, Llama 3.1, Gemma 3, Mistral v0.3 and SmolLM2.

The templates are copied verbatim into tests/data/chat_templates (see its SOURCES.md); no weights
are needed: the tiny tokenizer renders them, with each model's special tokens added so that token
boundaries fall where the real tokenizer's do. The trained tokens must be exactly the assistant
turns (their text and the end-of-turn that closes them), nothing of the system, user or tool turns.
"""

import json
import warnings
from pathlib import Path

import pytest

from forgetless.config import DataConfig, DatasetSpec
from forgetless.data.formats import IGNORE, Encoder, detect_format
from forgetless.data.loading import Record, load_records
from forgetless.errors import DataError, ForgetlessWarning
from forgetless.models.tiny import load_tiny_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
SPECIAL = {  # bos, eos, other special tokens of each model's tokenizer
    "qwen3": (None, "<|im_end|>", ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "smollm2": (None, "<|im_end|>", ["<|im_start|>"]),
}
END_OF_TURN = {"qwen3": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n", "mistral": "</s>", "smollm2": "<|im_end|>\n"}
LEAD = {"mistral": " "}  # Mistral writes the space before an answer itself; it is merged into the answer's first token


def tokenizer(name: str):
    tok = load_tiny_tokenizer()
    bos, eos, extra = SPECIAL[name]
    added = {"eos_token": eos, "additional_special_tokens": extra}
    if bos:
        added["bos_token"] = bos
    tok.add_special_tokens(added)
    tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tok


def encode(name: str, data: dict, **cfg):
    tok = tokenizer(name)
    ex = Encoder(tok, DataConfig(**cfg)).encode(Record(data, "chat.jsonl:1"), "messages")
    return tok, ex


def trained(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six."},
]


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_multi_turn_trains_exactly_the_assistant_turns(name):
    chat = CHAT[1:] if name == "mistral" else CHAT  # Mistral's template leaves the system prompt out of training renders
    tok, ex = encode(name, {"messages": chat})
    lead, eot = LEAD.get(name, ""), END_OF_TURN[name]
    assert trained(tok, ex) == f"{lead}Four.{eot}{lead}Six.{eot}"
    # the whole sequence is the conversation rendered once, as the template renders it
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(chat, tokenize=False)
    assert ex.reference == "Six."
    assert tok.decode(ex.prompt_ids) == tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)


def test_qwen3_multi_turn_works_although_its_prefixes_render_differently():
    """Qwen3 renders the empty think block only in the last assistant turn: prefix rendering fails,
    rendering once does not, and the template's think block is not trained."""
    tok = tokenizer("qwen3")
    full = tok.apply_chat_template(CHAT, tokenize=False)
    upto = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert not full.startswith(upto)  # what made every multi-turn Qwen3 record fail before
    _, ex = encode("qwen3", {"messages": CHAT})
    assert "<think>\n\n</think>\n\nSix." in tok.decode(ex.input_ids)
    assert trained(tok, ex) == "Four.<|im_end|>\nSix.<|im_end|>\n"


def test_qwen3_reasoning_is_trained_with_its_markup():
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."}]
    tok, ex = encode("qwen3", {"messages": chat})
    assert trained(tok, ex) == "<think>\nTwo plus two is four.\n</think>\n\n4<|im_end|>\n"
    # reasoning written inline is the same conversation to Qwen3's template
    inline = [chat[0], {"role": "assistant", "content": "<think>\nTwo plus two is four.\n</think>\n\n4"}]
    tok2, ex2 = encode("qwen3", {"messages": inline})
    assert ex2.input_ids == ex.input_ids and ex2.labels == ex.labels


def test_chat_template_kwargs_reach_the_template():
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    tok = tokenizer("qwen3")
    on = Encoder(tok, DataConfig()).encode(Record({"messages": chat}, "r"), "messages")
    off = Encoder(tok, DataConfig(chat_template_kwargs={"enable_thinking": False})).encode(Record({"messages": chat}, "r"), "messages")
    assert not tok.decode(on.prompt_ids).endswith("<think>\n\n</think>\n\n")
    assert tok.decode(off.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # a record's own kwargs override the data's
    rec = Record({"messages": chat, "chat_template_kwargs": {"enable_thinking": True}}, "r")
    again = Encoder(tok, DataConfig(chat_template_kwargs={"enable_thinking": False})).encode(rec, "messages")
    assert again.prompt_ids == on.prompt_ids


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tool_chat(call_id: str = "abc123def") -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": call_id, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "20 C, sunny", "tool_call_id": call_id},
        {"role": "assistant", "content": "It is 20 C and sunny."},
    ]}


@pytest.mark.parametrize("name, expected", [
    ("qwen3", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
              "It is 20 C and sunny.<|im_end|>\n"),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>It is 20 C and sunny.<|eot_id|>'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]</s> It is 20 C and sunny.</s>'),
])
def test_tool_calls_are_trained_and_tool_results_are_not(name, expected):
    tok, ex = encode(name, tool_chat())
    text = tok.decode(ex.input_ids)
    assert "Weather of a city" in text and "20 C, sunny" in text  # the tools and the result reach the template
    assert trained(tok, ex) == expected


def test_conversational_prompt_completion_trains_only_the_completion():
    rec = {"prompt": CHAT[:3] + CHAT[3:4], "completion": CHAT[4:]}
    tok, ex = encode("smollm2", rec)
    assert trained(tok, ex) == "Six.<|im_end|>\n"
    _, whole = encode("smollm2", {"messages": CHAT})
    assert ex.input_ids == whole.input_ids
    assert detect_format(Record(rec, "r")) == "messages"


@pytest.mark.parametrize("name", sorted(SPECIAL))
def test_unknown_role_is_refused_naming_the_record(name):
    chat = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}, {"role": "assistant", "content": "ok"}]
    tok = tokenizer(name)
    with pytest.raises(DataError, match=r"chat.jsonl:1: messages\[1\].role 'wizard' is not a role the chat template knows"):
        Encoder(tok, DataConfig()).encode_all([Record({"messages": chat}, "chat.jsonl:1")])


def test_a_role_the_template_defines_is_accepted():
    chat = [{"role": "user", "content": "run it"}, {"role": "ipython", "content": "42"}, {"role": "assistant", "content": "The answer is 42."}]
    tok, ex = encode("llama3", {"messages": chat})
    assert trained(tok, ex) == "The answer is 42.<|eot_id|>"


def test_a_template_that_drops_a_message_is_refused():
    dropping = "{% for m in messages %}{% if m.role != 'tool' %}<{{ m.role }}>{{ m.content }}</s>{% endif %}{% endfor %}"
    tok = load_tiny_tokenizer()
    chat = [{"role": "user", "content": "q"}, {"role": "tool", "content": "result"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"r: the chat template drops messages\[1\] \(role 'tool'\)"):
        Encoder(tok, DataConfig(chat_template=dropping)).encode(Record({"messages": chat}, "r"), "messages")


def test_mistral_dropping_the_system_prompt_is_a_warning_once():
    tok = tokenizer("mistral")
    enc = Encoder(tok, DataConfig())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ex = enc.encode(Record({"messages": CHAT}, "r"), "messages")
    assert [w.category for w in caught] == [ForgetlessWarning]
    assert trained(tok, ex) == " Four.</s> Six.</s>"


def test_generation_markers_are_used_when_the_template_has_them():
    marked = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = load_tiny_tokenizer()
    ex = Encoder(tok, DataConfig(chat_template=marked)).encode(Record({"messages": CHAT}, "r"), "messages")
    assert trained(tok, ex) == "Four.<|im_end|>Six.<|im_end|>"  # the template's own choice: no newline
    rec = Record({"prompt": CHAT[:4], "completion": CHAT[4:]}, "r")
    ex = Encoder(tok, DataConfig(chat_template=marked)).encode(rec, "messages")
    assert trained(tok, ex) == "Six.<|im_end|>"


@pytest.mark.parametrize("data, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, r"messages\[1\] must be an object with string"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\] has 'tool_calls' but its role is 'user'"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]}, r"tool_calls must be a non-empty list of calls"),
    ({"messages": [{"role": "assistant", "content": [{"type": "image"}]}]}, r"content has non-text parts"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, r"'prompt' is a list of messages, so 'completion' must be one too"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]}, r"'completion' has no 'assistant' message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "tools": "{not json"}, r"field 'tools' is a string but not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chat_template_kwargs": [1]}, r"'chat_template_kwargs' must be an object"),
])
def test_bad_conversations_are_refused(data, message):
    with pytest.raises(DataError, match="^f.jsonl:4: .*" + message):
        detect_format(Record(data, "f.jsonl:4"))


def test_text_parts_and_tools_as_a_json_string():
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]}
    tok, ex = encode("smollm2", parts)
    assert "Hi there" in tok.decode(ex.input_ids) and trained(tok, ex) == "Hello.<|im_end|>\n"
    as_string = dict(tool_chat(), tools=json.dumps(TOOLS))
    assert encode("qwen3", as_string)[1].input_ids == encode("qwen3", tool_chat())[1].input_ids


# -- other tools' layouts, converted as records are read --


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_sharegpt_is_converted(tmp_path):
    rec = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "20 C"},
        {"from": "gpt", "value": "20 C."}], "tools": json.dumps(TOOLS)}
    (got,) = load_records(DatasetSpec(path=write_jsonl(tmp_path / "s.jsonl", [rec])))
    assert got.data["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "20 C"}, {"role": "assistant", "content": "20 C."}]
    tok = tokenizer("qwen3")
    ex = Encoder(tok, DataConfig()).encode(got, detect_format(got))
    assert trained(tok, ex).endswith("</tool_call><|im_end|>\n20 C.<|im_end|>\n")


def test_sharegpt_unknown_tag_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}])
    with pytest.raises(DataError, match=r"s.jsonl:1: conversations\[1\].from 'robot' is not a ShareGPT role"):
        load_records(DatasetSpec(path=path))


def test_alpaca_is_converted(tmp_path):
    recs = [{"instruction": "Translate to French.", "input": "cat", "output": "chat", "history": [["Hi", "Hello"]], "system": "Be exact."},
            {"instruction": "Name a colour.", "input": "", "output": "Red."}]
    a, b = load_records(DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", recs)))
    assert a.data["messages"] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                  {"role": "user", "content": "Translate to French.\ncat"}, {"role": "assistant", "content": "chat"}]
    assert b.data["messages"] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    tok = tokenizer("smollm2")
    assert trained(tok, Encoder(tok, DataConfig()).encode(a, "messages")) == "Hello<|im_end|>\nchat<|im_end|>\n"


def test_columns_map_a_dataset_onto_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": "The capital of France is", "a": " Paris", "id": 3}])
    (rec,) = load_records(DatasetSpec(path=path, columns={"prompt": "q", "completion": "a"}))
    assert rec.data == {"prompt": "The capital of France is", "completion": " Paris", "id": 3}
    with pytest.raises(DataError, match=r"c.jsonl:1: column 'question' named in columns is not in the record \(found 'q', 'a', 'id'\)"):
        load_records(DatasetSpec(path=path, columns={"prompt": "question", "completion": "a"}))


@pytest.mark.parametrize("rec, message", [
    ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, r"a preference record \(chosen/rejected\) is for DPO-style training"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}, r"a preference record"),
    ({"prompt": "Q", "completion": "A", "label": False}, r"a KTO record .* marks undesirable completions"),
    ({"prompt": "Q", "completions": ["step 1", "step 2"], "labels": [True, False]}, r"a stepwise-supervision record"),
])
def test_preference_and_kto_records_are_refused(tmp_path, rec, message):
    with pytest.raises(DataError, match=r"p.jsonl:1: " + message):
        load_records(DatasetSpec(path=write_jsonl(tmp_path / "p.jsonl", [rec])))


def test_chosen_answers_can_be_trained_by_mapping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": " good", "rejected": " bad"}])
    (rec,) = load_records(DatasetSpec(path=path, columns={"completion": "chosen"}))
    assert rec.data["completion"] == " good"


def test_columns_are_validated():
    from forgetless.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.train\[0\].columns: 'promt' is not a field forgetless reads \(did you mean 'prompt'\?\)"):
        DatasetSpec(path="x.jsonl", columns={"promt": "q"}).validate("data.train[0]")
    with pytest.raises(ConfigError, match=r"maps one column to several fields"):
        DatasetSpec(path="x.jsonl", columns={"prompt": "q", "text": "q"}).validate("data.train[0]")
