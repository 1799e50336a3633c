"""The three record formats users of TRL know, turned into token ids and loss masks.

- ``{"text": ...}``: language modelling on every token.
- ``{"prompt": ..., "completion": ...}``: loss on the completion only (by default).
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template; loss on the assistant turns only (by default).

For chat data the assistant spans are found by rendering the conversation up to each assistant
turn (with and without that turn) and mapping the character spans onto tokens through the fast
tokenizer's offsets. This works with any prefix-consistent template, unlike transformers'
``return_assistant_tokens_mask``, which needs ``{% generation %}`` markers in the template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from forgetless.config import DataConfig
from forgetless.data.loading import Record
from forgetless.errors import DataError

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Example:
    """One tokenized record."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    where: str
    prompt_ids: Optional[list[int]] = None  # for generation: what the model is given
    reference: Optional[str] = None  # for generation: the expected answer

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


def detect_format(rec: Record, requested: str = "auto") -> str:
    """The format of a record, or a DataError naming the record and its fields."""
    d = rec.data
    if requested == "auto":
        if "messages" in d:
            fmt = "messages"
        elif "prompt" in d and "completion" in d:
            fmt = "prompt_completion"
        elif "text" in d:
            fmt = "text"
        else:
            found = ", ".join(repr(k) for k in list(d)[:6]) or "none"
            raise DataError(
                f"{rec.where}: the record has none of the fields 'text', 'prompt' + 'completion', or "
                f"'messages' (found {found}); rename its fields to one of these formats"
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

    if fmt == "text":
        need_str("text")
    elif fmt == "prompt_completion":
        need_str("prompt", allow_empty=True)
        need_str("completion")
    else:
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{rec.where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{rec.where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{rec.where}: the conversation has no 'assistant' message, so nothing to learn; add one or drop the record")


class Encoder:
    """Tokenizes records of any format into :class:`Example` objects, counting what it cuts."""

    def __init__(self, tokenizer, data_cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
        self.eos = tokenizer.eos_token_id
        template = data_cfg.chat_template
        self.chat_template = CHATML if template == "chatml" else template

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_all(self, records: list[Record], requested_format: str = "auto") -> tuple[list[Example], EncodeStats]:
        stats = EncodeStats(records=len(records))
        out = []
        for rec in records:
            fmt = detect_format(rec, requested_format)
            stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
            ex = self.encode(rec, fmt)
            ex = self._fit(ex, stats)
            if ex is not None:
                out.append(ex)
        stats.kept = len(out)
        return out, stats

    def encode(self, rec: Record, fmt: str) -> Example:
        d = rec.data
        if fmt == "text":
            ids = self.bos + self._ids(d["text"]) + [self.eos]
            return Example(ids, [IGNORE] * len(self.bos) + ids[len(self.bos):], rec.where)
        if fmt == "prompt_completion":
            prompt = self.bos + self._ids(d["prompt"])
            completion = self._ids(d["completion"]) + [self.eos]
            mask_prompt = self.cfg.completion_only_loss
            labels = ([IGNORE] * len(prompt) if mask_prompt else [IGNORE] * len(self.bos) + prompt[len(self.bos):]) + completion
            return Example(prompt + completion, labels, rec.where, prompt_ids=prompt, reference=d["completion"])
        return self._encode_messages(rec)

    def _render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        if self.chat_template is None and not getattr(self.tok, "chat_template", None):
            raise DataError(
                f"{where}: 'messages' data needs a chat template, and this model's tokenizer has none; "
                f"set data.chat_template=chatml (or a Jinja template), or use prompt/completion records"
            )
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # a template may raise on roles it does not know
            raise DataError(f"{where}: the chat template failed on this conversation ({str(e).splitlines()[0][:160]})") from None

    def _encode_messages(self, rec: Record) -> Example:
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec.data["messages"]]
        full = self._render(msgs, False, rec.where)
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = self._render(msgs[:i], True, rec.where) if i else ""
            upto = self._render(msgs[: i + 1], False, rec.where)
            if not (full.startswith(upto) and upto.startswith(prefix)):
                raise DataError(
                    f"{rec.where}: the chat template renders this conversation differently from its prefixes, "
                    f"so the assistant tokens cannot be located; use a prefix-consistent data.chat_template"
                )
            spans.append((len(prefix), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [IGNORE] * len(ids)
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            if not self.cfg.completion_only_loss or any(a <= s < b for a, b in spans):
                labels[j] = ids[j]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt_ids = self._ids(self._render(msgs[:last], True, rec.where)) if last else None
        return Example(ids, labels, rec.where, prompt_ids=prompt_ids, reference=msgs[last]["content"])

    def _fit(self, ex: Example, stats: EncodeStats) -> Optional[Example]:
        """Apply max_length: truncate or drop, and drop examples left with no target token."""
        limit = self.cfg.max_length
        if len(ex.input_ids) > limit:
            if self.cfg.truncation == "drop":
                stats.dropped_too_long += 1
                return None
            stats.truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:limit], ex.labels[:limit]
            if ex.prompt_ids is not None and len(ex.prompt_ids) >= limit:
                ex.prompt_ids = None  # nothing left to generate from
        if ex.num_targets == 0:
            stats.dropped_no_target += 1
            return None
        return ex


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts a BOS token in front (as Llama's do)."""
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id
