"""A chat over a cache that rolls back only a few tokens (DeepSeek V4's keeps a bounded
window and compressor state): when the next prompt diverges further back, the session
prefills anew instead of failing, and stays consistent."""

import pytest
from mlx_deepseek.chat.session import ChatSession
from mlx_lm.models.cache import KVCache
from tiny_chat import ScriptedModel, tokenizer_only

import mlx_deepseek  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_deepseek.decoding import cache_length, can_trim_cache
from mlx_deepseek.errors import DeepSeekError
from mlx_deepseek.models.v4_cache import CacheTrimError

ROLLBACK = 4


class BoundedCache(KVCache):
    """A KVCache that, like V4's, rolls back at most ROLLBACK tokens (or all of them)."""

    def can_trim(self, n: int) -> bool:
        return n >= self.offset or n <= ROLLBACK

    def trim(self, n: int) -> int:
        if not self.can_trim(n):
            raise CacheTrimError(f"cannot roll back {n} tokens")
        return super().trim(n)


class BoundedModel(ScriptedModel):
    def make_cache(self):
        return [BoundedCache() for _ in self.layers]


def test_can_trim_cache_asks_every_layer():
    cache = [BoundedCache(), KVCache()]
    for c in cache:
        c.offset = 10
    assert can_trim_cache(cache, 10) and can_trim_cache(cache, 6) and can_trim_cache(cache, 0)
    assert not can_trim_cache(cache, 5)


@pytest.mark.parametrize("bounded", [False, True])
def test_dropped_reasoning_far_back_prefills_anew(bounded):
    tok = tokenizer_only()
    replies = ["Two and two make four.</think>\n\nFour.", "A tale.</think>\n\nOnce upon a time."]
    model = (BoundedModel if bounded else ScriptedModel)(tok, replies)
    s = ChatSession(model, tok, name="DeepSeek-R1-tiny")
    answers = []
    for question in ("What is two plus two?", "Tell me a story"):
        chunks = list(s.respond(question))
        answers.append("".join(c.text for c in chunks if c.kind == "answer"))
        assert cache_length(s.cache) == len(s.tokens)
        assert model.context[: len(s.tokens)] == s.tokens
    assert answers == ["\n\nFour.", "\n\nOnce upon a time."]
    # the template drops turn 1's reasoning: the cache diverges some 10 tokens back; a
    # bounded cache cannot go there, so the whole conversation is prefilled again
    last = s.last
    prompt = s.render(s.conversation()[:-1], True)  # turn 2's whole prompt
    assert last.reused_tokens + last.prompt_tokens == len(
        tok.encode(prompt, add_special_tokens=False)
    )
    if bounded:
        assert last.reused_tokens == 0
    else:
        assert last.reused_tokens > 0


def test_saving_a_session_over_an_unsavable_cache_is_one_line(tmp_path):
    class V4LikeCache(KVCache):
        savable = False

    class V4LikeModel(ScriptedModel):
        def make_cache(self):
            return [V4LikeCache() for _ in self.layers]

    tok = tokenizer_only()
    s = ChatSession(V4LikeModel(tok, ["Hi."]), tok, name="DeepSeek-V3-tiny")
    list(s.respond("Hello"))
    with pytest.raises(DeepSeekError, match="cannot be saved to a session file yet"):
        s.save(tmp_path / "chat")
    assert not list(tmp_path.iterdir())  # nothing half-written
