"""Autoregressive token sampling: what tortoise-tts 3.0.0 gets from HF transformers 4.31.0 ``generate()``, in numpy.

UnifiedVoice.inference_speech calls ``generate(do_sample=True, top_p, temperature, repetition_penalty,
length_penalty, num_return_sequences, max_length, bos/pad/eos = stop_mel_token)``; top_k is transformers' default 50.
That runs ``GenerationMixin.sample()``: every step the logits processors, then the logits warpers, then softmax and
``torch.multinomial``. The blocks below mirror, in the order HF builds them:

  processors  RepetitionPenaltyLogitsProcessor, then tortoise's optional TypicalLogitsWarper (it passes it as a
              custom ``logits_processor``, which HF appends after its own processors, so greedy search applies it too)
  warpers     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper   (sampling only, min_tokens_to_keep=1)
  stopping    MaxLengthCriteria (sequence length >= max_length) and every row having emitted eos; rows that are
              finished keep receiving ``pad_token_id``.

length_penalty only matters to beam search, which tortoise never runs, so it has no counterpart here.

Arithmetic follows torch's float32 where it decides which tokens survive: the penalty and temperature divide in
float32, top-p compares float32 cumulative probabilities (torch accumulates cumsum in float64) with
float32(1 - top_p). Known divergences, none reachable on ordinary logits:
  * torch.sort is not stable for rows longer than 16 (libstdc++ introsort), so when tied scores straddle the top-p or
    typical cut, which of the tied tokens torch drops is implementation-defined. We sort stably (the lower token id
    is dropped first), which is what torch does for rows of at most 16.
  * softmax (and typical sampling's entropy) is computed in float64 and rounded, torch's float32 kernels differ by
    a few ulps: a cumulative probability within ~1e-7 of the top-p or typical threshold may be cut differently.
  * sampling draws from a numpy Generator by inverse CDF over float64 probabilities. torch's multinomial RNG stream
    cannot be reproduced, so a seed here gives reproducible results, not the reference's.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

# tortoise/api.py fix_autoregressive_output: the DVAE codes for silence and for the end of a clip
CALM_TOKEN = 83
END_CODES = (45, 45, 248)


# ----------------------------------------------------------------------------------------------------------------
# Logits processors and warpers (transformers/generation/logits_process.py)
# ----------------------------------------------------------------------------------------------------------------

def repetition_penalty_processor(scores: np.ndarray, input_ids: np.ndarray, penalty: float) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor: every id present in the row is penalised once, however often it occurs."""
    rows = np.arange(scores.shape[0])[:, None]
    score = scores[rows, input_ids]
    p = np.float32(penalty)
    score = np.where(score < 0, score * p, score / p)
    out = scores.copy()
    # duplicates in input_ids write the same value, so fancy-index assignment matches torch's scatter_
    out[rows, input_ids] = score
    return out


def typical_warper(scores: np.ndarray, mass: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """TypicalLogitsWarper: keep the tokens whose surprisal is closest to the entropy, up to probability ``mass``."""
    normalized = _log_softmax(scores)
    p = np.exp(normalized)
    with np.errstate(invalid="ignore"):   # -inf * 0 = nan, dropped by nansum as torch does
        ent = -np.nansum(normalized * p, axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    shifted_scores = np.abs(-normalized - ent)
    sorted_indices = np.argsort(shifted_scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(shifted_scores, sorted_indices, axis=-1)
    sorted_logits = np.take_along_axis(scores, sorted_indices, axis=-1)
    cumulative_probs = _cumsum_f32(_softmax(sorted_logits))
    last_ind = (cumulative_probs < np.float32(mass)).sum(axis=1)
    # HF would index out of range when every cumulative probability is below mass (rounding): take the last token
    last_ind = np.minimum(last_ind, scores.shape[-1] - 1)
    sorted_indices_to_remove = sorted_scores > np.take_along_axis(sorted_scores, last_ind[:, None], axis=1)
    sorted_indices_to_remove[..., :min_tokens_to_keep] = False
    return _masked_fill_sorted(scores, sorted_indices, sorted_indices_to_remove)


def temperature_warper(scores: np.ndarray, temperature: float) -> np.ndarray:
    """TemperatureLogitsWarper."""
    return scores / np.float32(temperature)


def top_k_warper(scores: np.ndarray, top_k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """TopKLogitsWarper: drop scores below the k-th largest; ties with the k-th largest all survive."""
    top_k = min(max(top_k, min_tokens_to_keep), scores.shape[-1])
    kth = -np.partition(-scores, top_k - 1, axis=-1)[..., top_k - 1:top_k]
    return np.where(scores < kth, np.float32(-np.inf), scores)


def top_p_warper(scores: np.ndarray, top_p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """TopPLogitsWarper: on an ascending sort, drop tokens while the cumulative probability is <= 1 - top_p."""
    cols = _live_columns(scores)
    if cols is not None:
        return _on_columns(scores, cols, lambda sub: top_p_warper(sub, top_p, min_tokens_to_keep))
    sorted_indices = np.argsort(scores, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(scores, sorted_indices, axis=-1)
    cumulative_probs = _cumsum_f32(_softmax(sorted_logits))
    # torch compares a float32 tensor with a Python float in float32
    sorted_indices_to_remove = cumulative_probs <= np.float32(1 - top_p)
    sorted_indices_to_remove[..., -min_tokens_to_keep:] = False
    return _masked_fill_sorted(scores, sorted_indices, sorted_indices_to_remove)


def process_logits(scores: np.ndarray, input_ids: np.ndarray, *, repetition_penalty: float = 1.0,
                   temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
                   typical_mass: float | None = None, do_sample: bool = True) -> np.ndarray:
    """The scores HF passes to softmax (sampling) or argmax (greedy) for next-token logits ``scores`` (N, V).

    ``input_ids`` (N, L) are all ids so far, prompt included (tortoise's placeholder ids and start token too).
    Settings that HF treats as "off" are off here: repetition_penalty 1.0, temperature 1.0, top_k 0 or None,
    top_p 1.0, typical_mass None. With ``do_sample=False`` only the processors run, as in HF greedy search.
    """
    scores, input_ids = _check_scores_and_ids(scores, input_ids)
    _check_settings(repetition_penalty, temperature, top_k, top_p, typical_mass)
    if repetition_penalty != 1.0:
        scores = repetition_penalty_processor(scores, input_ids, repetition_penalty)
    if typical_mass is not None:
        scores = typical_warper(scores, typical_mass)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = temperature_warper(scores, temperature)
    if top_k:
        scores = top_k_warper(scores, top_k)
    if top_p < 1.0:
        scores = top_p_warper(scores, top_p)
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Token choice and the generation loop (transformers/generation/utils.py sample() / greedy_search())
# ----------------------------------------------------------------------------------------------------------------

def multinomial(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row drawn from softmax(scores) by inverse CDF (the stand-in for torch.multinomial).

    A token whose score is -inf has probability 0 and can never be drawn.
    """
    cols = _live_columns(scores)
    if cols is not None:
        return np.take_along_axis(cols, multinomial(np.take_along_axis(scores, cols, axis=-1), rng)[:, None],
                                  axis=-1)[:, 0]
    probs = _softmax(scores, dtype=np.float64)
    if not np.all(np.isfinite(probs)):
        raise ValueError("multinomial: scores give non-finite probabilities (a row of all -inf, nan or +inf logits)")
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(scores.shape[0]) * cdf[:, -1]
    tokens = (cdf <= u[:, None]).sum(axis=-1)
    # u * total can round up to total: fall back to the last token that has any probability
    last_possible = scores.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(tokens, last_possible)


def generate(decode: Callable[[np.ndarray], np.ndarray], first_logits: np.ndarray, input_ids: np.ndarray, *,
             max_new_tokens: int | None = None, max_length: int | None = None,
             eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
             do_sample: bool = True, temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
             repetition_penalty: float = 1.0, typical_mass: float | None = None,
             rng: np.random.Generator | int | None = None,
             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """HF generate's sample()/greedy_search() loop over a caller's model. Returns input_ids + new tokens (N, L + n).

    ``first_logits`` (N, V): the model's logits after ``input_ids`` (N, L). ``decode(next_tokens (N,))`` feeds the
    tokens just chosen and returns the logits (N, V) for the position after them; it is not called after the last
    step. Generation stops when every row has emitted an eos token or the length reaches ``max_length``
    (= L + ``max_new_tokens``; give one of the two). Finished rows receive ``pad_token_id``, and are still fed to
    ``decode`` as HF feeds them to the model. ``rng``: a numpy Generator or a seed (sampling only).
    ``progress(generated, limit)`` is called after every step.
    """
    scores, input_ids = _check_scores_and_ids(first_logits, input_ids)
    _check_settings(repetition_penalty, temperature, top_k, top_p, typical_mass)
    n, prompt_len = input_ids.shape
    vocab = scores.shape[1]
    max_length = _resolve_max_length(prompt_len, max_new_tokens, max_length)
    eos = _check_eos_pad(eos_token_id, pad_token_id, vocab)
    rng = np.random.default_rng(rng) if do_sample else None
    settings = dict(repetition_penalty=repetition_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
                    typical_mass=typical_mass, do_sample=do_sample)

    ids = np.empty((n, max_length), dtype=np.int64)
    ids[:, :prompt_len] = input_ids
    cur_len = prompt_len
    unfinished = np.ones(n, dtype=bool)
    while True:
        next_scores = process_logits(scores, ids[:, :cur_len], **settings)
        if do_sample:
            next_tokens = multinomial(next_scores, rng)
        else:
            next_tokens = np.argmax(next_scores, axis=-1)
        if eos is not None:
            next_tokens = np.where(unfinished, next_tokens, pad_token_id)
        ids[:, cur_len] = next_tokens
        cur_len += 1
        if progress is not None:
            progress(cur_len - prompt_len, max_length - prompt_len)
        if eos is not None:
            unfinished &= ~np.isin(next_tokens, eos)
        if (eos is not None and not unfinished.any()) or cur_len >= max_length:
            break
        scores = np.asarray(decode(next_tokens))
        if scores.shape != (n, vocab):
            raise ValueError(f"generate: decode returned logits of shape {scores.shape}, expected {(n, vocab)}")
    return ids[:, :cur_len]


def fix_autoregressive_output(codes: np.ndarray, stop_token: int, complain: bool = True) -> np.ndarray:
    """tortoise/api.py fix_autoregressive_output on one clip's codes (T,), or on each row of (N, T); returns a copy.

    The stop token and everything after it become the calm (silence) code and the last three codes become the DVAE's
    end-of-clip codes, as the diffusion model was trained on. A clip without a stop token is returned unchanged
    (with a warning when ``complain``).
    """
    codes = np.asarray(codes)
    if codes.ndim not in (1, 2) or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"fix_autoregressive_output: codes must be integer (T,) or (N, T), got {codes.dtype} "
                         f"{codes.shape}")
    if codes.ndim == 2:
        return np.stack([fix_autoregressive_output(row, stop_token, complain) for row in codes]) if len(codes) \
            else codes.copy()
    codes = codes.copy()
    stop_token_indices = np.flatnonzero(codes == stop_token)
    if len(stop_token_indices) == 0:
        if complain:
            warnings.warn("No stop tokens found in one of the generated voice clips. This typically means the spoken "
                          "audio is too long. In some cases, the output will still be good, though. Listen to it and "
                          "if it is missing words, try breaking up your input text.", stacklevel=2)
        return codes
    if codes.shape[0] < len(END_CODES):
        raise ValueError(f"fix_autoregressive_output: a clip of {codes.shape[0]} codes has no room for the "
                         f"{len(END_CODES)} end codes")
    stm = stop_token_indices.min()
    codes[stm:] = CALM_TOKEN
    codes[-len(END_CODES):] = END_CODES
    return codes


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def _softmax(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Softmax over the last axis, computed in float64 and rounded to ``dtype``; -inf entries give 0."""
    x = x.astype(np.float64)
    with np.errstate(invalid="ignore"):   # a row of all -inf gives nan, as torch does
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(dtype)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        shifted = x64 - x64.max(axis=-1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def _live_columns(scores: np.ndarray) -> np.ndarray | None:
    """Token ids (N, m) holding every score above -inf of each row (in ascending id order), when m is under half
    the row.

    After top-k only ~k of 8194 scores are finite. -inf scores are inert in the softmax-based steps (probability
    exactly 0, cumulative sums unchanged, already filtered), so those steps can run on these columns alone; keeping
    token order keeps the stable sort's tie order.
    """
    live = scores > -np.inf
    counts = live.sum(axis=-1)
    m = int(counts.max())
    if m == 0 or 2 * m > scores.shape[-1]:
        return None
    if (counts == m).all():
        return np.nonzero(live)[1].reshape(-1, m)
    # rows with fewer live scores are padded with some of their -inf columns, which are inert wherever they sit
    return np.argsort(~live, axis=-1, kind="stable")[:, :m]


def _on_columns(scores: np.ndarray, cols: np.ndarray, step: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a filtering step to the given columns of each row; the other scores (all -inf) stay as they are."""
    out = scores.copy()
    np.put_along_axis(out, cols, step(np.take_along_axis(scores, cols, axis=-1)), axis=-1)
    return out


def _cumsum_f32(p: np.ndarray) -> np.ndarray:
    """torch's float32 cumsum: accumulated in float64, each partial sum rounded to float32."""
    return np.cumsum(p, axis=-1, dtype=np.float64).astype(np.float32)


def _masked_fill_sorted(scores: np.ndarray, sorted_indices: np.ndarray, sorted_to_remove: np.ndarray) -> np.ndarray:
    """Scatter a removal mask from sorted order back to token order and fill removed scores with -inf."""
    to_remove = np.empty_like(sorted_to_remove)
    np.put_along_axis(to_remove, sorted_indices, sorted_to_remove, axis=-1)
    return np.where(to_remove, np.float32(-np.inf), scores)


def _check_scores_and_ids(scores, input_ids) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    input_ids = np.asarray(input_ids)
    if scores.ndim != 2 or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be a float array (N, V), got {scores.dtype} {scores.shape}")
    if scores.shape[1] == 0:
        raise ValueError("scores must have a non-empty vocabulary axis")
    if input_ids.ndim != 2 or not (np.issubdtype(input_ids.dtype, np.integer) or input_ids.size == 0):
        raise ValueError(f"input_ids must be an integer array (N, L), got {input_ids.dtype} {input_ids.shape}")
    if input_ids.shape[0] != scores.shape[0]:
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows but scores has {scores.shape[0]}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= scores.shape[1]):
        raise ValueError(f"input_ids must lie in [0, {scores.shape[1]}), got [{input_ids.min()}, {input_ids.max()}]")
    return scores.astype(np.float32, copy=False), input_ids.astype(np.int64, copy=False)


def _check_settings(repetition_penalty, temperature, top_k, top_p, typical_mass) -> None:
    """The checks HF's processor constructors make, with the same meaning for 'off'."""
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty has to be a strictly positive float, but is {repetition_penalty}")
    if not temperature > 0:
        raise ValueError(f"temperature has to be a strictly positive float, but is {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"top_k has to be a non-negative integer (0 or None = off), but is {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p has to be a float in [0, 1], but is {top_p}")
    if typical_mass is not None and not 0.0 < typical_mass < 1.0:
        raise ValueError(f"typical_mass has to be a float in (0, 1), but is {typical_mass}")


def _resolve_max_length(prompt_len: int, max_new_tokens: int | None, max_length: int | None) -> int:
    if (max_new_tokens is None) == (max_length is None):
        raise ValueError("generate: give exactly one of max_new_tokens and max_length")
    if max_length is None:
        max_length = prompt_len + max_new_tokens
    if max_length <= prompt_len:
        raise ValueError(f"generate: max_length {max_length} leaves no room after a prompt of {prompt_len} tokens")
    return int(max_length)


def _check_eos_pad(eos_token_id, pad_token_id, vocab: int) -> np.ndarray | None:
    if eos_token_id is None:
        return None
    eos = np.atleast_1d(np.asarray(eos_token_id))
    if eos.ndim != 1 or not eos.size or not np.issubdtype(eos.dtype, np.integer):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    if pad_token_id is None:
        raise ValueError("If `eos_token_id` is defined, make sure that `pad_token_id` is defined.")
    if eos.min() < 0 or eos.max() >= vocab or not 0 <= pad_token_id < vocab:
        raise ValueError(f"eos_token_id {eos_token_id!r} / pad_token_id {pad_token_id} outside the vocabulary "
                         f"[0, {vocab})")
    return eos
