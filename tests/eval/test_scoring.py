import math

import torch

from forgetless.config import DataConfig, TinyModelConfig
from forgetless.data.formats import Encoder
from forgetless.data.loading import Record
from forgetless.eval.scoring import exact_match, normalize_answer, score_examples, stop_token_ids
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

TOK = load_tiny_tokenizer()


def test_normalisation():
    assert normalize_answer("  The  Paris. ") == "paris"
    assert exact_match(" Paris", "paris!")
    assert not exact_match("Paris France", "Paris")
    assert exact_match("an apple", "Apple")


def test_stop_tokens_include_end_of_turn():
    ids = stop_token_ids(TOK)
    assert TOK.eos_token_id in ids and TOK.convert_tokens_to_ids("<|im_end|>") in ids


def test_scores_match_a_direct_computation():
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=1)
    recs = [Record({"prompt": f"p{i} " * (i + 1), "completion": f" c{i}"}, "r") for i in range(5)]
    exs, _ = Encoder(TOK, DataConfig()).encode_all(recs)
    got = score_examples(model, exs, TOK, batch_size=2, generation=True, max_new_tokens=3)
    # direct: each example alone, token-weighted
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
