"""The record formats users of TRL and evaluation harnesses know, turned into token ids and loss masks.

- ``{"text": ...}``: language modelling on every token.
- ``{"prompt": ..., "completion": ...}``: loss on the completion only (by default).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; loss on the assistant turns only (by default).
- ``{"question" or "prompt": ..., "choices": [...], "answer": index or text}``: multiple choice.
  Trained on as prompt/completion with the correct choice as completion; scored as
  lm-evaluation-harness does (see :mod:`forgetless.eval.choice`). The prompt is ``prompt`` as
  written, or ``"Question: {question}\\nAnswer:"``; a choice follows it after one space (lm-eval's
  default ``target_delimiter``) unless the prompt ends in whitespace or the choice starts with it,
  and trailing whitespace of the prompt is moved to the start of the choice before tokenizing (as
  lm-eval's ``_encode_pair`` does), so ``"Answer: "`` + ``"Paris"`` is scored as ``" Paris"``.

Chat data (TRL's conversational forms, with tools and reasoning) is validated and its assistant
tokens located by :mod:`forgetless.data.chat`; the layouts of other tools (ShareGPT, alpaca,
renamed columns) are converted as records are read (:mod:`forgetless.data.conversions`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from forgetless.config import DataConfig
from forgetless.data.chat import ROLES, ChatTemplate, check_encodable, conversation, is_conversational, is_prompt_only  # noqa: F401 (re-exported)
from forgetless.data.loading import Record
from forgetless.errors import DataError

IGNORE = -100


@dataclass
class Example:
    """One tokenized record."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    where: str
    prompt_ids: Optional[list[int]] = None  # for generation: what the model is given
    reference: Optional[str] = None  # for generation: the expected answer
    record: Optional[dict] = None  # the raw record (what a user scoring function receives)
    # multiple choice: each choice's continuation tokens (after prompt_ids), its length in
    # characters (acc_norm), and the index of the correct one
    choices: Optional[list[list[int]]] = None
    choice_chars: Optional[list[int]] = None
    answer: Optional[int] = None
    # the last token is the end-of-text token the encoder appended (text, prompt/completion; not cut by
    # max_length): evaluation leaves it unscored unless eval.score_eos (training is unaffected)
    eos_appended: bool = False

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (the first token is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class EncodeStats:
    """What happened to the records of a dataset while encoding."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def add(self, other: "EncodeStats") -> None:
        """Count ``other``'s records in too (several datasets, concatenated)."""
        for k in ("records", "kept", "truncated", "dropped_too_long", "dropped_no_target"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for fmt, n in other.formats.items():
            self.formats[fmt] = self.formats.get(fmt, 0) + n


def detect_format(rec: Record, requested: str = "auto") -> str:
    """The format of a record, or a DataError naming the record and its fields."""
    d = rec.data
    if requested == "auto":
        if is_conversational(d):
            fmt = "messages"
        elif "choices" in d and "completion" not in d:
            fmt = "multiple_choice"
        elif "prompt" in d and "completion" in d:
            fmt = "prompt_completion"
        elif ("prompt" in d or "completion" in d) and "text" not in d:
            fmt = "prompt_completion"  # half a pair: the validation names the missing field
        elif "text" in d:
            fmt = "text"
        else:
            found = ", ".join(repr(k) for k in list(d)[:6]) or "none"
            raise DataError(
                f"{rec.where}: the record has none of the fields 'text', 'prompt' + 'completion', "
                f"'messages', or 'question' + 'choices' + 'answer' (found {found}); rename its fields to one of these formats"
            )
    else:
        fmt = requested
    _validate(rec, fmt)
    return fmt


def _validate(rec: Record, fmt: str) -> None:
    d = rec.data

    def need_str(key: str, allow_empty: bool = False) -> None:
        if key not in d:
            raise DataError(f"{rec.where}: field {key!r} is missing (format {fmt}); add it or fix the format")
        if not isinstance(d[key], str):
            raise DataError(f"{rec.where}: field {key!r} must be a string, got {type(d[key]).__name__}")
        if not allow_empty and not d[key].strip():
            raise DataError(f"{rec.where}: field {key!r} is empty; give it text or remove the record")
        check_encodable(d[key], rec.where, key)

    if fmt == "text":
        need_str("text")
    elif fmt == "multiple_choice":
        _validate_choice(rec)
    elif fmt == "prompt_completion":
        need_str("prompt", allow_empty=True)
        need_str("completion")
    else:
        conversation(d, rec.where)


def _validate_choice(rec: Record) -> None:
    d = rec.data
    key = "question" if "question" in d else "prompt"
    if key not in d:
        raise DataError(f"{rec.where}: a multiple-choice record needs a 'question' (or 'prompt') field; add it")
    if not isinstance(d[key], str):
        raise DataError(f"{rec.where}: field {key!r} must be a string, got {type(d[key]).__name__}")
    check_encodable(d[key], rec.where, key)
    choices = d.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{rec.where}: field 'choices' must be a list of at least two non-empty strings, got {choices!r:.120}")
    for i, c in enumerate(choices):
        check_encodable(c, rec.where, f"choices[{i}]")
    if "answer" not in d:
        raise DataError(f"{rec.where}: field 'answer' is missing; give the index of the correct choice (0-based) or its text")
    choice_answer(rec)


def choice_answer(rec: Record) -> int:
    """Index of the correct choice: ``answer`` is a 0-based index or the text of one of the choices."""
    answer, choices = rec.data["answer"], rec.data["choices"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise DataError(f"{rec.where}: 'answer' {answer} is not an index of the {len(choices)} choices (0-based); fix it")
        return answer
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        raise DataError(f"{rec.where}: 'answer' {answer!r:.80} is not one of the choices; give its exact text or its 0-based index")
    raise DataError(f"{rec.where}: 'answer' must be a choice index or a choice's text, got {type(answer).__name__}")


def choice_prompt(d: dict) -> str:
    """The text a choice continues: ``prompt`` verbatim, or the harness's ``Question: ...\\nAnswer:``."""
    return d["prompt"] if "question" not in d else f"Question: {d['question']}\nAnswer:"


def choice_continuation(prompt: str, choice: str) -> tuple[str, str]:
    """(context, continuation) as lm-eval forms them: one space between, prompt's trailing whitespace moved over."""
    sep = "" if (prompt[-1:].isspace() or choice[:1].isspace() or not prompt) else " "
    context = prompt.rstrip()
    return context, prompt[len(context):] + sep + choice


class Encoder:
    """Tokenizes records of any format into :class:`Example` objects, counting what it cuts."""

    def __init__(self, tokenizer, data_cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
        self.eos = tokenizer.eos_token_id
        self.chat = ChatTemplate(tokenizer, data_cfg.chat_template)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_all(self, records: list[Record], requested_format: str = "auto") -> tuple[list[Example], EncodeStats]:
        stats = EncodeStats()
        out = [ex for rec in records if (ex := self.encode_record(rec, requested_format, stats)) is not None]
        return out, stats

    def encode_record(self, rec: Record, requested_format: str, stats: EncodeStats) -> Optional[Example]:
        """One record: its format detected (a DataError names the record), encoded and fitted to
        max_length; ``stats`` counts it. None: dropped (too long, or no target left). Every path that
        tokenizes data (in memory, Arrow, stream) goes through here."""
        fmt = detect_format(rec, requested_format)
        stats.records += 1
        stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
        ex = self.encode(rec, fmt)
        ex.record = rec.data
        ex = self._fit(ex, stats)
        stats.kept += ex is not None
        return ex

    def encode(self, rec: Record, fmt: str) -> Example:
        d = rec.data
        if fmt == "text":
            ids = self.bos + self._ids(d["text"]) + [self.eos]
            return Example(ids, [IGNORE] * len(self.bos) + ids[len(self.bos):], rec.where, eos_appended=True)
        if fmt == "prompt_completion":
            prompt = self.bos + self._ids(d["prompt"])
            completion = self._ids(d["completion"]) + [self.eos]
            mask_prompt = self.cfg.completion_only_loss
            labels = ([IGNORE] * len(prompt) if mask_prompt else [IGNORE] * len(self.bos) + prompt[len(self.bos):]) + completion
            return Example(prompt + completion, labels, rec.where, prompt_ids=prompt, reference=d["completion"], eos_appended=True)
        if fmt == "multiple_choice":
            return self._encode_choice(rec)
        return self._encode_messages(rec)

    def _encode_choice(self, rec: Record) -> Example:
        """Prompt + correct choice + EOS for training; every choice's continuation tokens for scoring.

        Continuation tokens are those of ``context + continuation`` after the context's tokens, as in
        lm-eval, so a tokenizer that merges across the boundary still scores the whole choice.
        """
        d = rec.data
        answer = choice_answer(rec)
        prompt_text = choice_prompt(d)
        context = prompt_text.rstrip()
        context_ids = self.bos + self._ids(context)
        conts = []
        for text in d["choices"]:
            _, continuation = choice_continuation(prompt_text, text)
            conts.append((self.bos + self._ids(context + continuation))[len(context_ids):])
        if not context_ids:  # nothing to condition on: lm-eval starts from the end-of-text token
            context_ids = [self.eos]
        completion = conts[answer] + [self.eos]
        mask_prompt = self.cfg.completion_only_loss
        labels = ([IGNORE] * len(context_ids) if mask_prompt else [IGNORE] * len(self.bos) + context_ids[len(self.bos):]) + completion
        return Example(
            context_ids + completion, labels, rec.where, prompt_ids=context_ids, reference=d["choices"][answer],
            choices=conts, choice_chars=[len(c) for c in d["choices"]], answer=answer,
        )

    def _conversation(self, rec: Record, need_assistant: bool = True):
        conv = conversation(rec.data, rec.where, self.cfg.chat_template_kwargs, need_assistant)
        self.chat.require(rec.where)
        self.chat.check_roles(conv, rec.where)
        return self.chat.prepare(conv)

    def encode_prompt(self, rec: Record) -> list[int]:
        """The token ids a model is given for a prompt-only conversation (:func:`is_prompt_only`):
        the conversation rendered with the generation prompt of the assistant's turn."""
        conv = self._conversation(rec, need_assistant=False)
        return self._ids(self.chat.generation_prompt(conv, conv.messages, rec.where))

    def _encode_messages(self, rec: Record) -> Example:
        """The conversation rendered once; loss on the assistant turns (of the completion, for
        conversational prompt-completion records) as :mod:`forgetless.data.chat` locates them."""
        conv = self._conversation(rec)
        text = self.chat.render(conv, where=rec.where)
        pieces = self.chat.layout(conv, text, rec.where)  # also refuses templates that drop a message
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if not self.cfg.completion_only_loss:
            trained = [True] * len(ids)
        elif self.chat.has_generation_tags:
            trained = self._generation_mask(conv, text, pieces, enc, rec.where)
        else:
            spans = self.chat.assistant_spans(conv, text, pieces)
            # a token is the assistant's when it overlaps an assistant span (as transformers' mask does), so
            # a token that merges the template's space with the answer's first word (" Paris") is trained
            trained = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        prompt_ids = self._ids(self.chat.generation_prompt(conv, conv.messages[:last], rec.where)) if last else None
        return Example(ids, labels, rec.where, prompt_ids=prompt_ids, reference=conv.messages[last]["content"])

    def _generation_mask(self, conv, text: str, pieces, enc, where: str) -> list[bool]:
        """The template's own ``{% generation %}`` spans (transformers' assistant mask), from the completion on."""
        out = self.chat.assistant_mask(conv, where)
        if list(out["input_ids"]) != list(enc["input_ids"]):
            raise DataError(f"{where}: the chat template tokenizes differently with its assistant mask; report this template")
        begin = min([p.start for p in pieces if p.message >= conv.first_trained], default=0) if conv.first_trained else 0
        return [bool(m) and s >= begin for m, (s, _) in zip(out["assistant_masks"], enc["offset_mapping"])]

    def _fit(self, ex: Example, stats: EncodeStats) -> Optional[Example]:
        """Apply max_length: truncate or drop, and drop examples left with no target token."""
        limit = self.cfg.max_length
        if ex.choices is not None:
            return self._fit_choice(ex, stats)
        if len(ex.input_ids) > limit:
            if self.cfg.truncation == "drop":
                stats.dropped_too_long += 1
                return None
            stats.truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:limit], ex.labels[:limit]
            ex.eos_appended = False  # cut off with the end
            if ex.prompt_ids is not None and len(ex.prompt_ids) >= limit:
                ex.prompt_ids = None  # nothing left to generate from
        if ex.num_targets == 0:
            stats.dropped_no_target += 1
            return None
        return ex

    def _fit_choice(self, ex: Example, stats: EncodeStats) -> Optional[Example]:
        """Multiple choice: cut the prompt from the left (as lm-eval does) so the longest choice fits."""
        limit = self.cfg.max_length
        longest = max(len(c) for c in ex.choices)
        if len(ex.prompt_ids) + longest <= limit and len(ex.input_ids) <= limit:
            return ex
        keep = min(limit - longest, len(ex.prompt_ids))
        if self.cfg.truncation == "drop" or keep < 1:
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        cut = len(ex.prompt_ids) - keep
        ex.prompt_ids = ex.prompt_ids[cut:]
        ex.input_ids, ex.labels = ex.input_ids[cut:][:limit], ex.labels[cut:][:limit]
        return ex


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts a BOS token in front (as Llama's do)."""
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id
