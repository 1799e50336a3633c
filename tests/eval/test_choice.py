"""Multiple-choice records: format, prompt/choice join, training form, and log-likelihood scoring."""

import math
from types import SimpleNamespace

import pytest
import torch

from forgetless.config import DataConfig, TinyModelConfig
from forgetless.data.formats import IGNORE, Encoder, Example, choice_continuation, detect_format
from forgetless.data.loading import Record
from forgetless.errors import DataError
from forgetless.eval.choice import pick, score_choices
from forgetless.eval.scoring import score_examples
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

TOK = load_tiny_tokenizer()
CAPITALS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
    {"question": "What is the capital of Italy?", "choices": ["Paris", "Rome", "Berlin"], "answer": "Rome"},
    {"prompt": "Germany's capital is", "choices": ["Paris", "Rome", "Berlin", "Bonn"], "answer": 2},
    {"prompt": "Capital of Spain:\n", "choices": ["Madrid", "Lisbon"], "answer": "Madrid"},
]


def encode(records, **cfg):
    return Encoder(TOK, DataConfig(**cfg)).encode_all([Record(r, f"mc.jsonl:{i + 1}") for i, r in enumerate(records)])


def test_detected_and_validated():
    assert detect_format(Record(CAPITALS[0], "r")) == "multiple_choice"
    assert detect_format(Record(CAPITALS[2], "r")) == "multiple_choice"
    bad = [
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer' 2 is not an index of the 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "'answer' 'c' is not one of the choices"),
        ({"question": "q", "choices": "a, b", "answer": 0}, "field 'choices' must be a list of at least two non-empty strings"),
        ({"question": "q", "choices": ["a", "b"]}, "field 'answer' is missing"),
        ({"choices": ["a", "b"], "answer": 0}, "needs a 'question' \\(or 'prompt'\\)"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "must be a choice index or a choice's text"),
    ]
    for record, message in bad:
        with pytest.raises(DataError, match="^mc.jsonl:7: .*" + message):
            detect_format(Record(record, "mc.jsonl:7"))


def test_prompt_and_choice_are_joined_like_lm_eval():
    assert choice_continuation("Answer:", "Paris") == ("Answer:", " Paris")
    assert choice_continuation("Answer: ", "Paris") == ("Answer:", " Paris")  # trailing space moves over
    assert choice_continuation("Answer:\n", "Paris") == ("Answer:", "\nParis")
    assert choice_continuation("Answer:", " Paris") == ("Answer:", " Paris")


def test_encoded_for_training_as_prompt_and_correct_choice():
    exs, stats = encode(CAPITALS)
    assert stats.formats == {"multiple_choice": 4} and len(exs) == 4
    first = exs[0]
    assert TOK.decode(first.prompt_ids) == "Question: What is the capital of France?\nAnswer:"
    assert TOK.decode([t for t in first.labels if t != IGNORE]) == " Paris" + TOK.eos_token
    assert first.input_ids == first.prompt_ids + first.choices[0] + [TOK.eos_token_id]
    assert [TOK.decode(c) for c in exs[2].choices] == [" Paris", " Rome", " Berlin", " Bonn"]
    assert TOK.decode(exs[3].choices[1]) == "\nLisbon"
    assert [e.answer for e in exs] == [0, 1, 2, 0] and exs[1].reference == "Rome"
    assert exs[2].choice_chars == [5, 4, 6, 4]
    assert exs[0].record == CAPITALS[0]  # what a scoring function receives


def test_long_prompts_are_cut_from_the_left():
    record = {"prompt": "word " * 40 + "Answer:", "choices": ["yes", "no"], "answer": 0}
    (ex,), stats = encode([record], max_length=12)
    assert stats.truncated == 1
    assert len(ex.prompt_ids) + max(len(c) for c in ex.choices) <= 12 and TOK.decode(ex.prompt_ids).endswith("Answer:")
    assert encode([record], max_length=12, truncation="drop")[1].dropped_too_long == 1


class BigramLM(torch.nn.Module):
    """The next token depends only on the current one: log p(b | a) = table[a, b]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def log_probs(vocab: int, row: dict[int, float]) -> torch.Tensor:
    """A row of log-probabilities with the given entries; the rest share the remaining mass."""
    rest = (1 - sum(math.exp(v) for v in row.values())) / (vocab - len(row))
    return torch.tensor([row.get(i, math.log(rest)) for i in range(vocab)])


def test_known_log_likelihoods_give_acc_and_acc_norm():
    # after the prompt token 1: "x" (token 2) has log p -2; "long answer" is tokens 3, 4 with -1 + -2 = -3
    V = 6
    table = torch.stack([log_probs(V, {})] * V)
    table[1] = log_probs(V, {2: -2.0, 3: -1.0})
    table[3] = log_probs(V, {4: -2.0})
    model = BigramLM(table)
    ex = Example([1, 3, 4, 0], [IGNORE, 3, 4, 0], "r", prompt_ids=[1], reference="long answer",
                 choices=[[2], [3, 4]], choice_chars=[1, 11], answer=1)
    (scores,) = score_choices(model, [ex], pad_id=0, batch_size=2, device=torch.device("cpu"))
    assert [c.loglik for c in scores] == pytest.approx([-2.0, -3.0], abs=1e-5)
    assert pick([-2.0, -3.0], [1, 11]) == (0, 1)  # summed: "x"; per character: "long answer"
    got = score_examples(model, [ex], TOK, generation=False, metric="multiple_choice_norm")
    assert (got["mc_accuracy"], got["mc_accuracy_norm"], got["score"]) == (0.0, 1.0, 1.0)
    # loss and token accuracy are those of the correct choice: -(-3) / 2 tokens; token 3 is the argmax after 1, 4 is not after 3
    assert got["loss"] == pytest.approx(1.5, abs=1e-5) and got["token_accuracy"] == 0.5 and got["target_tokens"] == 2


def test_ties_go_to_the_first_choice():
    assert pick([-1.0, -1.0, -2.0], [3, 3, 3]) == (0, 0)


def test_batched_scores_equal_a_direct_loop_per_choice():
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=3)
    exs, _ = encode(CAPITALS)
    batched = score_choices(model, exs, pad_id=TOK.pad_token_id, batch_size=3, device=torch.device("cpu"))
    hits = hits_norm = 0
    with torch.no_grad():
        for e, got in zip(exs, batched):
            direct = []
            for c in e.choices:
                logp = torch.log_softmax(model(input_ids=torch.tensor([e.prompt_ids + c])).logits[0], -1)
                direct.append(sum(logp[len(e.prompt_ids) - 1 + j, t].item() for j, t in enumerate(c)))
            assert [g.loglik for g in got] == pytest.approx(direct, abs=1e-4)
            hits += max(range(len(direct)), key=direct.__getitem__) == e.answer
            hits_norm += max(range(len(direct)), key=lambda i: direct[i] / e.choice_chars[i]) == e.answer
    scores = score_examples(model, exs, TOK, batch_size=3, generation=True, max_new_tokens=2)
    assert scores["mc_accuracy"] == hits / 4 and scores["mc_accuracy_norm"] == hits_norm / 4
    assert scores["score"] == scores["mc_accuracy"] and scores["examples"] == 4
    assert "exact_match" not in scores  # scored by likelihood: no decoding unless the metric needs it
    decoded = score_examples(model, exs, TOK, batch_size=3, generation=False, max_new_tokens=2, metric="exact_match")
    assert decoded["score"] == decoded["exact_match"] and decoded["mc_accuracy"] == scores["mc_accuracy"]
