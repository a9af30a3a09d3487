"""Sampling on the device (greedy, temperature, top-k, top-p, seeded draws), its parameter
validation, and the host-side stop rules of a sequence (append_token, validate_prompt)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitsum_jax.config import preset
from nitsum_jax.sampling import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingBatch,
                                 SamplingError, SamplingParams, sample)
from nitsum_jax.sequence import RequestError, Sequence, append_token, validate_prompt
from nitsum_jax.tokenizer import TextTokenizer

VOCAB = preset("tiny").vocab_size  # 264
EOS = 257
sample_jit = jax.jit(sample)


def random_logits(rows: int, seed: int, scale: float = 3.0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, scale, size=(rows, VOCAB)).astype(np.float32)
    assert np.all(logits != 0)
    return logits


def draw(logits: np.ndarray, params: list[SamplingParams], seeds, positions) -> np.ndarray:
    batch = SamplingBatch.from_params(params, seeds=list(seeds), positions=list(positions))
    return np.asarray(sample_jit(logits, batch))


def many_seeds(logits_row: np.ndarray, params: SamplingParams, n: int = 512, position: int = 0) -> np.ndarray:
    """The same logits row drawn with `n` different seeds."""
    logits = np.repeat(logits_row[None, :], n, axis=0)
    return draw(logits, [params] * n, seeds=range(1000, 1000 + n), positions=[position] * n)


def test_vocab_is_the_tiny_presets():
    assert VOCAB == 264


# --- greedy and top-k ---------------------------------------------------------------------

def test_temperature_zero_is_argmax_whatever_top_k_and_top_p_say():
    logits = random_logits(8, seed=0)
    params = [SamplingParams(temperature=0.0, top_k=k, top_p=p)
              for k, p in [(0, 1.0), (5, 0.3), (1, 0.9), (100, 0.01)] * 2]

    tokens = draw(logits, params, seeds=range(8), positions=range(8))

    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    assert tokens.dtype == np.int32


def test_default_params_rows_are_greedy():
    logits = random_logits(3, seed=1)

    tokens = draw(logits, [None, None, None], seeds=[1, 2, 3], positions=[0, 0, 0])

    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_one_with_temperature_is_argmax_for_every_seed():
    logits = random_logits(1, seed=2, scale=0.5)[0]  # flat-ish: without top_k=1 draws would vary

    tokens = many_seeds(logits, SamplingParams(temperature=1.5, top_k=1))

    assert set(tokens.tolist()) == {int(logits.argmax())}


@pytest.mark.parametrize("k", [3, 10])
def test_top_k_draws_only_among_the_k_largest_logits(k):
    logits = random_logits(1, seed=3, scale=1.0)[0]
    allowed = set(np.argsort(-logits)[:k].tolist())

    tokens = many_seeds(logits, SamplingParams(temperature=1.0, top_k=k))

    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) >= min(k, 3)  # it really samples, not just argmax


# --- top-p ---------------------------------------------------------------------------------

def test_small_top_p_with_one_dominant_logit_always_gives_the_top_token():
    logits = random_logits(1, seed=4, scale=1.0)[0]
    top = int(logits.argmax())
    rest = np.exp(np.delete(logits, top).astype(np.float64)).sum()
    logits[top] = np.log(rest / 2)  # a third of the mass: dominant, yet most plain draws miss it

    with_top_p = many_seeds(logits, SamplingParams(temperature=1.0, top_p=0.05))
    without = many_seeds(logits, SamplingParams(temperature=1.0, top_p=1.0))

    assert set(with_top_p.tolist()) == {top}
    assert np.mean(without != top) > 0.5


def test_top_p_draws_only_from_the_smallest_prefix_reaching_p():
    logits = random_logits(1, seed=5, scale=1.5)[0]
    temperature, top_p = 0.7, 0.6
    order = np.argsort(-logits)
    probs = np.exp((logits[order] - logits.max()) / temperature)
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    nucleus = set(order[mass_before < top_p].tolist())
    assert 2 < len(nucleus) < VOCAB // 2

    tokens = many_seeds(logits, SamplingParams(temperature=temperature, top_p=top_p))

    assert set(tokens.tolist()) <= nucleus
    assert len(set(tokens.tolist())) > 2


# --- seeding -------------------------------------------------------------------------------

def test_same_seed_and_position_give_the_same_token():
    logits = random_logits(6, seed=6, scale=0.5)
    params = [SamplingParams(temperature=1.0)] * 6
    seeds, positions = [11, 11, 12, 13, 14, 15], [5, 5, 0, 1, 2, 3]

    first = draw(logits, params, seeds, positions)
    second = draw(logits, params, seeds, positions)

    np.testing.assert_array_equal(first, second)


def test_a_rows_token_does_not_depend_on_the_other_rows_of_the_batch():
    rng = np.random.default_rng(7)
    row_params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_k=3),
              SamplingParams(temperature=1.0, top_p=0.2)]
    for seed in range(12):
        row = random_logits(1, seed=100 + seed, scale=1.0)
        alone = draw(row, [row_params], seeds=[seed], positions=[seed + 3])
        batch_logits = np.concatenate([row, random_logits(3, seed=200 + seed)], axis=0)
        other_seeds = rng.integers(0, 2**32, size=3).tolist()
        together = draw(batch_logits, [row_params] + others, seeds=[seed] + other_seeds,
                        positions=[seed + 3] + rng.integers(0, 1000, size=3).tolist())
        assert together[0] == alone[0], f"seed {seed}"


def test_different_seeds_give_different_tokens_over_a_flat_distribution():
    logits = random_logits(1, seed=8, scale=0.01)[0]  # nearly uniform, never exactly equal

    tokens = many_seeds(logits, SamplingParams(temperature=1.0), n=64)

    assert len(set(tokens.tolist())) > 30


def test_different_positions_with_one_seed_give_different_tokens():
    n = 64
    logits = np.repeat(random_logits(1, seed=9, scale=0.01), n, axis=0)

    tokens = draw(logits, [SamplingParams(temperature=1.0)] * n, seeds=[42] * n, positions=range(n))

    assert len(set(tokens.tolist())) > 30


# --- parameter validation ------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0),
    ("temperature", -1.0),
    ("temperature", float("nan")),
    ("top_k", 1000),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("seed", -1),
    ("seed", 2**32),
    ("stop_token_ids", (9999,)),
    ("stop", ("",)),
])
def test_validate_rejects_out_of_range_values_naming_the_field(field, value):
    params = SamplingParams(**{field: value})

    with pytest.raises(SamplingError) as info:
        params.validate(VOCAB)

    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_error_names_the_value_and_the_range():
    with pytest.raises(SamplingError, match=r"top_k must be in \[0, 264\].*got 1000"):
        SamplingParams(top_k=1000).validate(VOCAB)
    with pytest.raises(SamplingError, match=r"9999.*\[0, 264\)"):
        SamplingParams(stop_token_ids=(9999,)).validate(VOCAB)


def test_validate_accepts_the_edges_of_each_range():
    SamplingParams(max_tokens=1, temperature=0.0, top_k=VOCAB, top_p=1.0, seed=0,
                   stop=("x",), stop_token_ids=(0, VOCAB - 1)).validate(VOCAB)
    SamplingParams(temperature=100.0, top_k=0, top_p=1e-6, seed=2**32 - 1).validate(VOCAB)


@pytest.mark.parametrize("field, value, words", [
    ("stop_token_ids", (1,) * (MAX_STOP_TOKEN_IDS + 1), [f"{MAX_STOP_TOKEN_IDS + 1} entries",
                                                         f"limit {MAX_STOP_TOKEN_IDS}"]),
    ("stop", ("ab",) * (MAX_STOP_STRINGS + 1), [f"{MAX_STOP_STRINGS + 1} strings", f"limit {MAX_STOP_STRINGS}"]),
    ("stop", ("a" * (MAX_STOP_STRING_CHARS + 1),), [f"{MAX_STOP_STRING_CHARS + 1} characters",
                                                    f"limit {MAX_STOP_STRING_CHARS}"]),
])
def test_stop_rules_are_bounded_in_count_and_length(field, value, words):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**{field: value}).validate(VOCAB)
    assert field.split("_")[0] in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    edge = {"stop_token_ids": (1,) * MAX_STOP_TOKEN_IDS, "stop": ("b" * MAX_STOP_STRING_CHARS,) * MAX_STOP_STRINGS}
    SamplingParams(**{field: edge[field]}).validate(VOCAB)


# --- append_token: stop rules --------------------------------------------------------------

class CountingTuple(tuple):
    """A tuple that counts how often it is searched or walked."""

    walks = 0

    def __contains__(self, item):
        CountingTuple.walks += 1
        return super().__contains__(item)

    def __iter__(self):
        CountingTuple.walks += 1
        return super().__iter__()


def test_stop_token_ids_are_not_searched_once_per_token(tok):
    CountingTuple.walks = 0
    seq = make_seq(max_tokens=50, stop_token_ids=CountingTuple(range(100, 100 + MAX_STOP_TOKEN_IDS - 100)))
    assert feed(seq, [ord("a")] * 40 + [150], tok) == 41 and seq.finish_reason == "stop"
    assert CountingTuple.walks <= 1  # once, into a set: per token a set lookup, not a walk of the list

@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.byte_level()


def make_seq(**params) -> Sequence:
    return Sequence(seq_id="r0", prompt_ids=[256, 72, 105], params=SamplingParams(**params), seed=0)


def feed(seq: Sequence, tokens, tokenizer) -> int:
    """Append tokens until the sequence finishes; returns how many were appended."""
    for i, t in enumerate(tokens):
        append_token(seq, t, tokenizer, eos_token_ids=(EOS,))
        if seq.finished:
            return i + 1
    return len(tokens)


def test_byte_level_token_ids_are_byte_values(tok):
    assert tok.encode("Hi!", add_bos=False) == [72, 105, 33]
    assert tok.vocab_size == VOCAB


def test_stop_string_truncates_the_text_before_it_and_finishes_with_stop(tok):
    seq = make_seq(max_tokens=50, stop=("lo w",))

    n = feed(seq, list(b"hello world"), tok)

    assert n == len("hello w")  # finished on the token that completed the stop string
    assert seq.finish_reason == "stop"
    assert seq.text == "hel"
    assert seq.output_ids == list(b"hello w")
    assert seq.completion().finish_reason == "stop"


def test_text_follows_the_tokens_until_a_stop_string_appears(tok):
    seq = make_seq(max_tokens=50, stop=("xyz",))

    feed(seq, list(b"abc"), tok)

    assert not seq.finished
    assert seq.text == "abc"


def test_stop_token_id_finishes_with_stop(tok):
    seq = make_seq(max_tokens=50, stop_token_ids=(ord("!"),))

    n = feed(seq, list(b"yes! more"), tok)

    assert n == 4
    assert seq.finish_reason == "stop"
    assert seq.output_ids == list(b"yes!")


def test_eos_finishes_with_stop(tok):
    seq = make_seq(max_tokens=50)

    n = feed(seq, [ord("o"), ord("k"), EOS, ord("x")], tok)

    assert n == 3
    assert seq.finish_reason == "stop"
    assert seq.text == "ok"  # the special token is not in the text


def test_eos_is_ignored_with_ignore_eos_and_max_tokens_then_ends_it(tok):
    seq = make_seq(max_tokens=4, ignore_eos=True)

    n = feed(seq, [EOS, ord("a"), EOS, ord("b"), ord("c")], tok)

    assert n == 4
    assert seq.finish_reason == "length"
    assert seq.output_ids == [EOS, ord("a"), EOS, ord("b")]


def test_max_tokens_finishes_with_length_exactly_at_the_limit(tok):
    seq = make_seq(max_tokens=3)

    append_token(seq, ord("a"), tok, (EOS,))
    append_token(seq, ord("b"), tok, (EOS,))
    assert not seq.finished
    append_token(seq, ord("c"), tok, (EOS,))

    assert seq.finish_reason == "length"
    assert seq.text == "abc"
    assert seq.completion().token_ids == list(b"abc")
    assert seq.completion().prompt_tokens == 3


def test_without_a_tokenizer_token_rules_still_apply():
    seq = make_seq(max_tokens=10, stop=("a",))  # stop strings need text: ignored here

    n = feed(seq, [ord("a"), ord("b"), EOS], None)

    assert n == 3
    assert seq.finish_reason == "stop"
    assert seq.text is None


# --- validate_prompt -----------------------------------------------------------------------

def test_empty_prompt_is_refused():
    with pytest.raises(RequestError, match="empty"):
        validate_prompt([], SamplingParams(), VOCAB, max_seq_len=100)


@pytest.mark.parametrize("bad", [VOCAB, 10_000, -1])
def test_out_of_vocab_prompt_id_is_refused_naming_it(bad):
    with pytest.raises(RequestError) as info:
        validate_prompt([1, 2, bad, 3], SamplingParams(), VOCAB, max_seq_len=100)

    assert str(bad) in str(info.value)
    assert f"[0, {VOCAB})" in str(info.value)


def test_prompt_plus_max_tokens_over_the_context_limit_is_refused_naming_the_numbers():
    with pytest.raises(RequestError) as info:
        validate_prompt(list(range(10)), SamplingParams(max_tokens=20), VOCAB, max_seq_len=25)

    msg = str(info.value)
    for number in ("10", "20", "30", "25"):
        assert number in msg
    assert "max_tokens" in msg


def test_prompt_plus_max_tokens_exactly_at_the_limit_is_accepted():
    validate_prompt(list(range(10)), SamplingParams(max_tokens=15), VOCAB, max_seq_len=25)


def test_validate_prompt_also_validates_the_sampling_params():
    with pytest.raises(SamplingError, match="top_p"):
        validate_prompt([1, 2], SamplingParams(top_p=0.0), VOCAB, max_seq_len=100)


def test_incremental_text_equals_a_full_decode_and_finds_stops_across_multibyte_tokens(tok):
    text = "naïve café 日本語 ok 🙂 done"
    ids = list(text.encode())  # byte-level: multi-byte characters span several tokens
    decoder = tok.stream()
    for i, t in enumerate(ids):
        decoder.add(t)
        assert tok.decode(ids[:i + 1]).startswith(decoder.text)  # never ahead of the tokens
    assert decoder.text == tok.decode(ids) == text

    seq = make_seq(max_tokens=200, stop=("本語 o",))
    n = feed(seq, ids, tok)
    assert n == len("naïve café 日本語 o".encode())  # the token that completed the stop string
    assert seq.text == "naïve café 日"
    assert seq.finish_reason == "stop"

    seq = make_seq(max_tokens=len(ids))
    feed(seq, ids, tok)
    assert seq.finish_reason == "length" and seq.text == text


def test_sample_rows_equals_the_branching_sample_and_its_logprobs():
    """The serving lanes' cond-free draw (`sample_rows`) gives the tokens of `sample` for a batch
    mixing greedy, temperature, top-k and top-p rows, with log-probabilities of the untempered model."""
    from nitsum_jax.sampling import draws, sample_rows

    logits = jax.random.normal(jax.random.key(5), (4, 300)) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.5, top_k=10, seed=2), SamplingParams(temperature=1.0, top_p=0.5, seed=3)]
    batch = SamplingBatch.from_params(params, [p.seed or 0 for p in params], [11, 12, 13, 14])
    tokens, logprobs = jax.jit(sample_rows)(logits, batch)
    np.testing.assert_array_equal(tokens, sample_jit(logits, batch))
    np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[jnp.arange(4), tokens], atol=1e-6)
    assert draws(batch) and not draws(SamplingBatch.from_params([SamplingParams()] * 2, [0, 0], [1, 2]))
    assert not draws(None)  # lanes: None means every row is greedy
    assert SamplingParams().greedy and SamplingParams(temperature=1e-6).greedy and not params[1].greedy
