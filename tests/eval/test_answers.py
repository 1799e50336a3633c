"""Exact match judges the answer: cut at the first stop token and (one-line references) the first line, then normalised.

``data/smollm2_generations.json`` holds real greedy continuations of SmolLM2-135M-Instruct (32 new
tokens, cut at its first end-of-text / end-of-turn token only), recorded once with

    python tests/eval/data/record_generations.py "$(forgetless fetch smollm2)"

(the script's docstring says how to get the file). No model is needed here: the tests check the
answer cut and the normalisation on those outputs, and decoding on a scripted tiny model.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from forgetless.config import DataConfig, TinyModelConfig
from forgetless.data.formats import Encoder
from forgetless.data.loading import Record
from forgetless.eval.scoring import (
    AUTO_MARGIN, answer_contains, answer_text, auto_max_new_tokens, exact_match, generate, normalize_answer, one_line_references, score_examples,
)
from forgetless.models.tiny import build_tiny_model, load_tiny_tokenizer

TOK = load_tiny_tokenizer()
EOS = TOK.eos_token_id
GENERATIONS = json.loads((Path(__file__).parent / "data" / "smollm2_generations.json").read_text(encoding="utf-8"))["records"]


def by_set() -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {}
    for r in GENERATIONS:
        sets.setdefault(r["set"], []).append(r)
    return sets


def test_real_generations_are_judged_on_their_first_line():
    sets = by_set()
    answers = {}
    for name, recs in sets.items():
        one_line = one_line_references([r["reference"] for r in recs])
        assert one_line == (name != "chat")
        for r in recs:
            answers[r["prompt"]] = answer_text(r["continuation"], one_line)
    assert answers["The capital of Afghanistan is"] == " Kabul."
    assert answers["The capital of Australia is"] == " Sydney."
    assert answers["The chemical symbol of hydrogen is"] == " H."  # SmolLM2 emitted its end-of-text later on
    assert answers["The currency of Croatia is the"] == " Croatian kuna, which is the official currency of Croatia."
    hits = {name: [r["prompt"] for r in recs if exact_match(answers[r["prompt"]], r["reference"])] for name, recs in sets.items()}
    assert hits["demo:capitals"] == [f"The capital of {c} is" for c in ("Afghanistan", "Austria", "Azerbaijan", "Greece")]
    assert hits["demo:elements"] == ["The chemical symbol of hydrogen is", "The chemical symbol of oxygen is"]
    assert hits["demo:currencies"] == ["The currency of Austria is the", "The currency of Belgium is the"]  # " Euro." and " euro."
    # the whole continuation (what was compared before) matches nothing of the one-line sets
    assert not any(exact_match(r["continuation"], r["reference"]) for name, recs in sets.items() if name != "chat" for r in recs)


def test_multi_line_references_keep_the_whole_answer():
    fruits, colours = by_set()["chat"]
    assert answer_text(fruits["continuation"], one_line=False) == "1. Bananas\n2. Apples\n3. Oranges"
    assert exact_match(fruits["continuation"], fruits["reference"])
    assert not exact_match(colours["continuation"], colours["reference"])  # Blue and Green swapped
    assert fruits["stopped"] and colours["stopped"]  # ended by the end-of-turn token, not by a line


def test_answer_cut_by_hand():
    assert answer_text(" Paris.\nThe capital of Italy is", one_line=True) == " Paris."
    assert answer_text("\n\n Paris\nmore", one_line=True) == "\n\n Paris"  # leading blank lines are not an empty answer
    assert answer_text(" Paris", one_line=True) == " Paris"
    assert answer_text("", one_line=True) == "" and answer_text("\n\n", one_line=True) == "\n\n"
    assert answer_text("line one\nline two", one_line=False) == "line one\nline two"
    assert one_line_references([" Paris", "Rome\n"]) and not one_line_references([" Paris", "Rome\nItaly"])
    assert not exact_match("", " Paris") and not exact_match("\n\n", " Paris") and exact_match("", " ")


def test_normalisation():
    assert normalize_answer("  The  Paris. ") == "paris"
    assert exact_match(" Paris", "paris!") and exact_match(" Kabul.", " Kabul") and exact_match(" Euro.", " euro")
    assert not exact_match("Paris France", "Paris")
    assert exact_match("an apple", "Apple")
    assert normalize_answer("«Paris» — “the” city…") == "paris city"  # Unicode punctuation too
    assert normalize_answer("ＰＡＲＩＳ") == "paris" and normalize_answer("STRASSE") == normalize_answer("straße")
    assert normalize_answer(" St. John's") == "st johns" and normalize_answer("a\tb\n c") == "b c"


class Scripted(LlamaForCausalLM):
    """A tiny Llama whose greedy continuation is scripted by the prompt's last token.

    ``script[last][k]`` is the k-th generated token (the last one repeats); ``forwards`` counts the
    forward passes inside ``generate`` (the prefill and each further token).
    """

    def __init__(self, script: dict[int, list[int]]):
        base = build_tiny_model(TinyModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1), TOK, seed=0)
        super().__init__(base.config)
        self.generation_config = base.generation_config
        self.script, self.forwards, self._last, self._width = script, 0, None, 0

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        if not past:  # a prefill (or a plain forward)
            self._last, self._width = input_ids[:, -1].tolist(), input_ids.shape[1]
        step = past + input_ids.shape[1] - self._width
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = torch.full_like(out.logits, -1e4)
        for row, last in enumerate(self._last):
            tokens = self.script.get(last, [EOS])
            logits[row, -1, tokens[min(step, len(tokens) - 1)]] = 0.0
        out.logits = logits
        self.forwards += 1
        return out


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_decoding_stops_each_sequence_at_its_stop_token_or_line_end():
    paris, rome, junk = ids(" Paris"), ids(" Rome"), ids(" and more")
    newline = ids("\n")
    script = {ids("Q A")[-1]: paris + newline + junk, ids("Q B")[-1]: rome + [EOS] + junk, ids("Q C")[-1]: newline + rome + newline + junk}
    prompts = [ids("Q A"), ids("Q B"), ids("Q C")]
    model = Scripted(script)
    one = generate(model, prompts, TOK, batch_size=3, max_new_tokens=20, one_line=True)
    assert one == [" Paris", " Rome", "\n Rome"]
    # the batch ends when its last sequence does: C's answer line ends with its 4th token (prefill + 3 more)
    assert model.forwards == len(newline + rome + newline)
    model.forwards = 0
    many = generate(model, prompts, TOK, batch_size=3, max_new_tokens=len(paris) + 4, one_line=False)
    # multi-line: the line break is kept and decoding goes on to max_new_tokens; the end-of-text still ends B's answer
    assert many[0] == TOK.decode((paris + newline + junk + junk[-1:] * 8)[: len(paris) + 4]) and many[1] == " Rome"
    assert model.forwards == len(paris) + 4
    with torch.no_grad():
        alone = [generate(model, [p], TOK, batch_size=1, max_new_tokens=20, one_line=True)[0] for p in prompts]
    assert alone == one  # batching, padding and order change nothing


def pc_examples(records):
    exs, _ = Encoder(TOK, DataConfig(max_length=64)).encode_all([Record(r, f"r{i}") for i, r in enumerate(records)])
    return exs


def test_the_longest_generation_follows_the_longest_reference():
    recs = [{"prompt": f"Q {c}", "completion": ref} for c, ref in (("A", " Paris"), ("B", " Rome"))]
    exs = pc_examples(recs)
    assert auto_max_new_tokens([" Paris", " Rome"], TOK) == len(ids(" Paris")) + AUTO_MARGIN
    endless = {ids("Q A")[-1]: ids(" x"), ids("Q B")[-1]: ids(" x")}  # never a stop token, never a line break
    model = Scripted(endless)
    score_examples(model, exs, TOK, metric="exact_match")
    assert model.forwards == 1 + len(ids(" Paris")) + AUTO_MARGIN  # the loss pass, then prefill + every further token
    model.forwards = 0
    score_examples(model, exs, TOK, metric="exact_match", max_new_tokens=2)
    assert model.forwards == 1 + 2  # a value that is set is used as it is


def test_sets_whose_metric_needs_no_generation_are_not_decoded():
    exs = pc_examples([{"prompt": "Q A", "completion": " Paris"}])
    model = Scripted({ids("Q A")[-1]: ids(" Paris") + [EOS]})
    for metric in ("token_accuracy", "loss", "perplexity"):
        got = score_examples(model, exs, TOK, generation=True, metric=metric)
        assert "exact_match" not in got
    assert model.forwards == 3  # one loss pass each, no generate
    got = score_examples(model, exs, TOK, generation=True)  # no metric: exact match, decoded
    assert got["exact_match"] == 1.0 and got["score"] == 1.0


def test_sharded_exact_match_adds_up_and_decodes_alike():
    refs = [" Paris", " Rome", " Paris", " Rome", " Paris"]
    recs = [{"prompt": f"Q {'A' if i % 2 == 0 else 'B'}", "completion": r} for i, r in enumerate(refs)]
    exs = pc_examples(recs)
    script = {ids("Q A")[-1]: ids(" Paris.") + ids("\n") + ids(" x"), ids("Q B")[-1]: ids(" Rom")}  # B is wrong and never ends
    whole = score_examples(Scripted(script), exs, TOK, metric="exact_match", batch_size=2)
    assert whole["exact_match"] == pytest.approx(3 / 5)
    hits, forwards = 0.0, []
    for rank in range(2):
        model = Scripted(script)
        part = score_examples(model, exs, TOK, metric="exact_match", batch_size=2, rank=rank, world_size=2)
        hits += part["exact_match"] * len(exs[rank::2])
        forwards.append(model.forwards)
    assert hits == pytest.approx(3.0)
    # process 1 holds only the " Rome" records, yet decodes to the whole set's bound (" Paris" + margin):
    # one loss pass, then one batch decoded to the limit
    assert forwards[1] == 1 + len(ids(" Paris")) + AUTO_MARGIN


def test_contains_gives_a_chat_answer_credit_for_the_reference_as_whole_words():
    # SmolLM2-135M-Instruct's own answers in its chat template (recorded by hand)
    assert answer_contains("The capital of Kenya is Nairobi.", "Nairobi")
    assert not exact_match("The capital of Kenya is Nairobi.", "Nairobi")
    assert answer_contains("The capital of the United States is Washington, D.C.", "Washington, D.C.")
    assert answer_contains("«SAN JOSÉ» is the capital", "San José")
    assert not answer_contains("Nairobian food", "Nairobi")  # whole words only
    assert not answer_contains("anything", "") and not answer_contains("", "Paris")


def test_contains_metric_decodes_and_scores():
    exs = pc_examples([{"prompt": "Q A", "completion": " Paris"}, {"prompt": "Q B", "completion": " Rome"}])
    model = Scripted({ids("Q A")[-1]: ids(" It is Paris.") + [EOS], ids("Q B")[-1]: ids(" Milan") + [EOS]})
    got = score_examples(model, exs, TOK, metric="contains", max_new_tokens=8)
    assert got["contains"] == 0.5 and got["score"] == 0.5 and got["exact_match"] == 0.0
    assert "contains" not in score_examples(model, exs, TOK, metric="exact_match", max_new_tokens=8)
