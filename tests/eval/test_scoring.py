import math

import torch

from forgetless.config import DataConfig, TinyModelConfig
from forgetless.data.formats import Encoder
from forgetless.data.loading import Record
from forgetless.eval.scoring import score_examples, stop_token_ids
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

TOK = load_tiny_tokenizer()


def test_stop_tokens_include_end_of_turn():
    ids = stop_token_ids(TOK)
    assert TOK.eos_token_id in ids and TOK.convert_tokens_to_ids("<|im_end|>") in ids


def test_scores_match_a_direct_computation():
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=1)
    recs = [Record({"prompt": f"p{i} " * (i + 1), "completion": f" c{i}"}, "r") for i in range(5)]
    exs, _ = Encoder(TOK, DataConfig()).encode_all(recs)
    got = score_examples(model, exs, TOK, batch_size=2, generation=True, max_new_tokens=3, score_eos=True)
    # direct: each example alone, token-weighted, every label (the appended end-of-text included)
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for e in exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            m = labels != -100
            total += torch.nn.functional.cross_entropy(logits[m], labels[m], reduction="sum").item()
            correct += (logits[m].argmax(-1) == labels[m]).sum().item()
            n += int(m.sum())
    assert got["target_tokens"] == n
    assert math.isclose(got["loss"], total / n, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(total / n), rel_tol=1e-5)
    assert math.isclose(got["token_accuracy"], correct / n)
    assert 0.0 <= got["exact_match"] <= 1.0 and got["examples"] == 5


def test_sharded_scores_add_up_to_the_whole():
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=1)
    exs, _ = Encoder(TOK, DataConfig()).encode_all([Record({"text": f"text number {i} " * (i + 1)}, "r") for i in range(7)])
    whole = score_examples(model, exs, TOK, generation=False)
    parts = [score_examples(model, exs, TOK, generation=False, rank=r, world_size=2) for r in range(2)]
    assert parts[0]["target_tokens"] + parts[1]["target_tokens"] == whole["target_tokens"]
    mixed = (parts[0]["loss"] * parts[0]["target_tokens"] + parts[1]["loss"] * parts[1]["target_tokens"]) / whole["target_tokens"]
    assert math.isclose(mixed, whole["loss"], rel_tol=1e-6)


def test_the_appended_end_of_text_is_not_scored_unless_asked():
    """lm-eval's loglikelihood convention: the EOS the encoder appends to every completion / text is
    what training learns to stop on, not part of the answer; eval.score_eos puts it back."""
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=1)
    recs = [Record({"prompt": f"Question {i}:", "completion": f" answer {i}" * (i + 1)}, "r") for i in range(5)]
    recs += [Record({"text": f"some text {i} " * (i + 2)}, "t") for i in range(3)]
    exs, _ = Encoder(TOK, DataConfig()).encode_all(recs)
    assert all(e.eos_appended and e.input_ids[-1] == e.labels[-1] == TOK.eos_token_id for e in exs)
    without = score_examples(model, exs, TOK, batch_size=3, generation=False)
    with_eos = score_examples(model, exs, TOK, batch_size=3, generation=False, score_eos=True)
    assert with_eos["target_tokens"] - without["target_tokens"] == len(exs)  # exactly one per record
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for e in exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1][:-1]  # nothing predicts past the EOS
            labels = torch.tensor(e.labels[1:-1])
            m = labels != -100
            total += torch.nn.functional.cross_entropy(logits[m], labels[m], reduction="sum").item()
            correct += (logits[m].argmax(-1) == labels[m]).sum().item()
            n += int(m.sum())
    assert without["target_tokens"] == n
    assert math.isclose(without["loss"], total / n, rel_tol=1e-5) and math.isclose(without["token_accuracy"], correct / n)
    # training still learns the EOS: the examples are unchanged
    assert all(e.labels[-1] == TOK.eos_token_id for e in exs)


def test_a_record_cut_by_max_length_loses_no_other_token():
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=1)
    (cut,), stats = Encoder(TOK, DataConfig(max_length=8)).encode_all([Record({"text": "a long text " * 10}, "r")])
    assert stats.truncated == 1 and not cut.eos_appended and cut.labels[-1] != TOK.eos_token_id
    a = score_examples(model, [cut], TOK, generation=False)
    b = score_examples(model, [cut], TOK, generation=False, score_eos=True)
    assert a["target_tokens"] == b["target_tokens"] == cut.num_targets
    chat, _ = Encoder(TOK, DataConfig(chat_template="chatml")).encode_all(
        [Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "c")])
    assert not chat[0].eos_appended  # the end-of-turn token of a chat is part of the answer, scored either way
