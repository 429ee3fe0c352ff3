"""Chat templating and tokenization, done once per request, in the gateway."""

from __future__ import annotations

import asyncio
from typing import Sequence

from services.gateway.protocol import ChatMessage


class PromptBuilder:
    """Turns OpenAI prompts and messages into token ids with the model's own tokenizer."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if not getattr(self.tokenizer, "chat_template", None):
            self.chat_template_missing = True
        else:
            self.chat_template_missing = False
        self.eos_token_id = self.tokenizer.eos_token_id
        self.vocab_size = len(self.tokenizer)

    def _chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        convo = [{"role": m.role, "content": m.text()} for m in messages]
        text = self.tokenizer.apply_chat_template(convo, add_generation_prompt=True,
                                                  tokenize=False)
        # The template renders special tokens (bos) itself: do not add them again.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    async def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a chat conversation, with the generation prompt appended."""
        return await asyncio.to_thread(self._chat_ids, messages)

    async def text(self, prompt: str) -> list[int]:
        """Token ids of a completion prompt (with the tokenizer's special tokens)."""
        return await asyncio.to_thread(self._text_ids, prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
