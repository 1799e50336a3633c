"""Per-example verdicts (score_examples(verdicts=...)) and the flips between two sets of them."""

import pytest

from forgetless.config import DataConfig, TinyModelConfig
from forgetless.data.formats import Encoder
from forgetless.data.loading import Record
from forgetless.eval.flips import compare, counts, flip_rows
from forgetless.eval.scoring import score_examples
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

TOK = load_tiny_tokenizer()
SHAPE = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_counts_lost_and_gained_on_the_examples_judged_both_times():
    before = [(0, True, "a"), (1, True, "b"), (2, False, "x"), (3, False, "y"), (4, True, "e")]
    after = [(0, True, "a"), (1, False, "c"), (2, True, "z"), (3, False, "w")]  # 4 not judged after
    f = compare(before, after)
    assert f == {"judged": 4, "right_before": 2, "right_after": 2, "lost": [1], "gained": [2]}
    assert counts(f) == {"judged": 4, "right_before": 2, "right_after": 2, "lost": 1, "gained": 1}
    assert f["right_before"] - len(f["lost"]) + len(f["gained"]) == f["right_after"]


def test_flip_rows_name_the_prompt_reference_and_both_answers():
    recs = [Record({"prompt": f"Q{i}:", "completion": f" A{i}"}, "r") for i in range(3)]
    exs, _ = Encoder(TOK, DataConfig()).encode_all(recs)
    before, after = [(0, True, "A0"), (1, False, "no")], [(0, False, "B0"), (1, True, "A1")]
    rows = flip_rows(compare(before, after), before, after, exs)["examples"]
    assert rows["lost"] == [{"index": 0, "prompt": "Q0:", "reference": "A0", "before": "A0", "after": "B0"}]
    assert rows["gained"][0]["prompt"] == "Q1:" and rows["gained"][0]["after"] == "A1"


def test_generated_verdicts_agree_with_the_score_and_shard_into_the_whole():
    model = build_tiny_model(SHAPE, TOK, seed=1)
    # answers the random model gets right: the first token its greedy decoding gives is the reference
    recs = [Record({"prompt": f"p{i} " * (i + 1), "completion": f" c{i}"}, "r") for i in range(7)]
    exs, _ = Encoder(TOK, DataConfig()).encode_all(recs)
    found = []
    whole = score_examples(model, exs, TOK, batch_size=3, max_new_tokens=3, metric="exact_match", verdicts=found)
    assert [i for i, _, _ in found] == list(range(7))
    assert sum(r for _, r, _ in found) / 7 == whole["exact_match"]
    parts = []
    for rank in range(2):  # two "processes"; gather concatenates what each holds (as accelerate's gather_object)
        mine = []
        score_examples(model, exs, TOK, batch_size=3, max_new_tokens=3, metric="exact_match", rank=rank, world_size=2,
                       gather=lambda xs: xs, verdicts=mine)
        parts += mine
    assert sorted(parts) == found
    # a set scored by token accuracy judges no single example
    none = []
    score_examples(model, exs, TOK, metric="token_accuracy", verdicts=none)
    assert none == []


def test_multiple_choice_verdicts_are_the_picked_choice():
    model = build_tiny_model(SHAPE, TOK, seed=2)
    recs = [Record({"question": f"Which is {i}?", "choices": [f"one {i}", f"two {i}", "three"], "answer": i % 3}, "r") for i in range(6)]
    exs, _ = Encoder(TOK, DataConfig()).encode_all(recs)
    found = []
    got = score_examples(model, exs, TOK, metric="multiple_choice", verdicts=found)
    assert len(found) == 6 and sum(r for _, r, _ in found) / 6 == got["mc_accuracy"]
    assert all(answer in recs[i].data["choices"] for i, _, answer in found)
