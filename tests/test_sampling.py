"""tortoise_ggml.sampling against transformers 4.31.0's own logits processors and generate() loop, and against
tortoise/api.py's fix_autoregressive_output."""
import numpy as np
import pytest

from tortoise_ggml.utils import sampling

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

TORTOISE = dict(repetition_penalty=2.0, temperature=0.8, top_k=50, top_p=0.8)  # api.py tts() defaults + HF top_k


def hf_process(scores, input_ids, *, repetition_penalty=1.0, temperature=1.0, top_k=50, top_p=1.0,
               typical_mass=None, do_sample=True):
    """The processor list HF generate() builds for these settings (utils.py _get_logits_processor/_get_logits_warper,
    tortoise's typical warper merged in as a custom processor), applied with torch."""
    procs = []
    if repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
    if typical_mass is not None:
        procs.append(lp.TypicalLogitsWarper(mass=typical_mass))
    if do_sample:
        if temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(float(temperature)))
        if top_k:
            procs.append(lp.TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            procs.append(lp.TopPLogitsWarper(top_p=top_p))
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    out = lp.LogitsProcessorList(procs)(ids, torch.from_numpy(np.array(scores, dtype=np.float32)))
    return out.numpy()


def assert_same(ours, ref):
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    np.testing.assert_array_equal(ours, ref)


def random_case(seed, n, v, length, scale=3.0):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((n, v)) * scale).astype(np.float32)   # about half negative
    ids = rng.integers(0, v, (n, length))
    ids[:, : length // 2] = ids[:, length // 2: 2 * (length // 2)]     # duplicated ids in every row
    return scores, ids


# ----------------------------------------------------------------------------------------------------------------
# process_logits vs HF processors
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    TORTOISE,
    dict(TORTOISE, top_k=0),                                # top-p alone over the full vocabulary
    dict(TORTOISE, top_p=1.0),                              # top-k alone
    dict(repetition_penalty=1.3, temperature=1.7, top_k=7, top_p=0.35),
    dict(repetition_penalty=0.6, temperature=1.0, top_k=None, top_p=0.95),   # penalty < 1 boosts repeats
    dict(TORTOISE, typical_mass=0.9),                       # tortoise's typical_sampling=True
    dict(TORTOISE, do_sample=False),                        # greedy: processors only
    dict(TORTOISE, typical_mass=0.5, do_sample=False),
])
def test_process_logits_matches_hf(settings):
    scores, ids = random_case(0, 6, 8194, 40)
    ours = sampling.process_logits(scores, ids, **settings)
    assert_same(ours, hf_process(scores, ids, **settings))
    assert np.isfinite(ours).any(axis=1).all()


def test_process_logits_does_not_modify_inputs():
    scores, ids = random_case(1, 2, 100, 10)
    before = scores.copy()
    sampling.process_logits(scores, ids, **TORTOISE)
    np.testing.assert_array_equal(scores, before)


def test_repetition_penalty_duplicates_and_signs():
    scores = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0, 3.0]], dtype=np.float32)
    ids = np.array([[0, 0, 0, 2, 3, 4, 4]])      # id 0 three times is still penalised once
    ours = sampling.process_logits(scores, ids, repetition_penalty=2.0, top_k=0)
    assert_same(ours, hf_process(scores, ids, repetition_penalty=2.0, top_k=0))
    assert ours[0, 0] == -4.0 and ours[0, 4] == 1.0 and ours[0, 5] == 3.0


def test_top_k_larger_than_vocab_and_ties():
    scores, ids = random_case(2, 3, 20, 5)
    settings = dict(TORTOISE, top_p=1.0)             # top_k 50 > V 20: keeps all
    assert_same(sampling.process_logits(scores, ids, **settings), hf_process(scores, ids, **settings))
    tied = np.round(random_case(3, 4, 8194, 1)[0]).astype(np.float32)   # ~10 distinct values: ties at the k-th
    no_ids = np.zeros((4, 0), np.int64)
    ours = sampling.process_logits(tied, no_ids, top_k=50)
    assert_same(ours, hf_process(tied, no_ids, top_k=50))
    assert (np.isfinite(ours).sum(axis=1) > 50).all()                  # every tie with the 50th survives


def test_top_k_ties_then_top_p():
    # rows keep different numbers of tokens when some tie with their k-th largest score
    scores, ids = random_case(11, 5, 8194, 30)
    for row, extra in enumerate([0, 1, 3, 0, 7]):
        kth = np.sort(scores[row])[-50]
        scores[row, np.argsort(scores[row])[:extra]] = kth
    assert len(set(np.isfinite(sampling.top_k_warper(scores, 50)).sum(axis=1))) == 4
    ours = sampling.process_logits(scores, ids, **TORTOISE)
    assert_same(ours, hf_process(scores, ids, **TORTOISE))


def test_top_p_edge_and_ties():
    # five equal logits: cumulative 0.2 <= float32(1 - 0.8) only in float32, so torch drops the first one
    flat = np.zeros((1, 5), dtype=np.float32)
    ours = sampling.process_logits(flat, np.zeros((1, 0), np.int64), top_k=0, top_p=0.8)
    assert_same(ours, hf_process(flat, np.zeros((1, 0)), top_k=0, top_p=0.8))
    assert np.isfinite(ours).sum() == 4
    # ties straddling the cut on rows of <= 16 tokens, where torch's sort is stable like ours
    rng = np.random.default_rng(4)
    tied = rng.integers(-3, 3, (64, 16)).astype(np.float32)
    for top_p in (0.0, 0.3, 0.5, 0.8, 0.97, 1.0):
        ours = sampling.process_logits(tied, np.zeros((64, 0), np.int64), top_k=0, top_p=top_p)
        assert_same(ours, hf_process(tied, np.zeros((64, 0)), top_k=0, top_p=top_p))
    # top_p 0 keeps exactly one token (min_tokens_to_keep)
    scores, ids = random_case(5, 4, 300, 3)
    ours = sampling.process_logits(scores, ids, top_k=0, top_p=0.0)
    assert_same(ours, hf_process(scores, ids, top_k=0, top_p=0.0))
    assert (np.isfinite(ours).sum(axis=1) == 1).all()


def test_random_sweep_matches_hf():
    rng = np.random.default_rng(6)
    for case in range(12):
        v = int(rng.choice([5, 16, 64, 1000]))
        scores, ids = random_case(100 + case, 3, v, int(rng.integers(0, 30)), scale=float(rng.uniform(0.3, 8)))
        settings = dict(repetition_penalty=float(rng.choice([1.0, 2.0, 0.7])),
                        temperature=float(rng.choice([1.0, 0.8, 1.5])), top_k=int(rng.choice([0, 1, 3, 50])),
                        top_p=float(rng.choice([1.0, 0.8, 0.3, 0.999])), do_sample=bool(rng.integers(0, 2)))
        assert_same(sampling.process_logits(scores, ids, **settings), hf_process(scores, ids, **settings))


@pytest.mark.parametrize("bad, match", [
    (dict(scores=np.zeros((2, 5, 1), np.float32)), "scores"),
    (dict(scores=np.zeros((2, 5), np.int64)), "scores"),
    (dict(input_ids=np.zeros((3, 2), np.int64)), "rows"),
    (dict(input_ids=np.full((2, 2), 5)), r"\[0, 5\)"),
    (dict(input_ids=np.zeros((2, 2), np.float32)), "input_ids"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(typical_mass=1.0), "typical_mass"),
])
def test_process_logits_rejects_bad_input(bad, match):
    args = dict(scores=np.zeros((2, 5), np.float32), input_ids=np.zeros((2, 2), np.int64))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sampling.process_logits(args.pop("scores"), args.pop("input_ids"), **args)


# ----------------------------------------------------------------------------------------------------------------
# generate() vs HF generate() on a deterministic fake model
# ----------------------------------------------------------------------------------------------------------------

class FakeLM:
    """Logits as a fixed function of the whole prefix (last two tokens, a digest, the position)."""

    def __init__(self, seed, vocab, eos, eos_bias):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.last = (rng.standard_normal((vocab, vocab)) * 2).astype(np.float32)
        self.prev = rng.standard_normal((vocab, vocab)).astype(np.float32)
        self.digest = rng.standard_normal((17, vocab)).astype(np.float32)
        self.pos = rng.standard_normal((64, vocab)).astype(np.float32)
        self.last[:, eos] += eos_bias

    def logits(self, ids):
        """(N, L) ids -> (N, V) next-token logits."""
        t = ids.shape[1]
        return (self.last[ids[:, -1]] + self.prev[ids[:, -2]] + self.digest[ids.sum(axis=1) % 17]
                + self.pos[t % 64]).astype(np.float32)

    def torch_model(self):
        """A GPT2LMHeadModel whose forward returns these logits, for HF generate()."""
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
        fake = self

        class Model(GPT2LMHeadModel):
            def forward(self, input_ids=None, **kwargs):
                # no past_key_values returned: HF passes the full ids every step
                logits = np.zeros(tuple(input_ids.shape) + (fake.vocab,), np.float32)
                logits[:, -1] = fake.logits(input_ids.numpy())
                return CausalLMOutputWithCrossAttentions(logits=torch.from_numpy(logits))

        return Model(GPT2Config(vocab_size=self.vocab, n_embd=8, n_layer=1, n_head=1, n_positions=256)).eval()

    def ours(self, prompt, **kwargs):
        """sampling.generate driven by a decode closure over the same logits; returns (ids, decode calls)."""
        ids = [np.asarray(prompt)]
        calls = []

        def decode(next_tokens):
            calls.append(next_tokens.copy())
            ids.append(next_tokens[:, None])
            return self.logits(np.concatenate(ids, axis=1))

        out = sampling.generate(decode, self.logits(ids[0]), ids[0], **kwargs)
        return out, calls


def hf_generate(fake, prompt, **kwargs):
    with torch.no_grad():
        return fake.torch_model().generate(torch.from_numpy(np.asarray(prompt, dtype=np.int64)), **kwargs).numpy()


def test_greedy_generate_matches_hf_token_for_token():
    eos = 3
    seen = set()
    for seed, eos_bias, max_new in [(0, 1.5, 40), (1, 3.0, 40), (2, -9.0, 12), (3, 2.0, 40), (4, 2.5, 25)]:
        fake = FakeLM(seed, 24, eos, eos_bias)
        prompt = np.random.default_rng(seed).integers(0, 24, (4, 6))
        prompt[:, -1] = 7   # the start token
        ref = hf_generate(fake, prompt, do_sample=False, max_length=6 + max_new, eos_token_id=eos, pad_token_id=eos,
                          bos_token_id=eos, repetition_penalty=2.0)
        ours, calls = fake.ours(prompt, do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos,
                                repetition_penalty=2.0, temperature=0.8, top_p=0.1)   # warpers ignored, as in HF
        np.testing.assert_array_equal(ours, ref)
        assert len(calls) == ours.shape[1] - 6 - 1          # decode is not called after the last step
        gen = ours[:, 6:]
        finished_at = [np.flatnonzero(row == eos)[0] if (row == eos).any() else None for row in gen]
        if gen.shape[1] == max_new:
            seen.add("length limit")
        if all(f is not None for f in finished_at) and gen.shape[1] < max_new:
            seen.add("all rows stopped early")
        if len({f for f in finished_at}) > 1:
            seen.add("rows stop at different steps")
    assert seen == {"length limit", "all rows stopped early", "rows stop at different steps"}


def test_sampled_generate_matches_hf_with_shared_uniforms(monkeypatch):
    """HF's sample() with torch.multinomial replaced by the same inverse CDF on the same uniforms: the processors,
    warpers, pad and stop logic must then give the very same tokens as ours, at tortoise's settings."""
    eos, vocab, n = 5, 120, 6
    fake = FakeLM(7, vocab, eos, 4.0)
    prompt = np.array([[1, 1, 1, 1, 1, 9]])                     # tortoise's placeholder ids + start token
    uniforms = np.random.default_rng(123)

    def multinomial(probs, num_samples=1):
        cdf = np.cumsum(probs.double().numpy(), axis=-1)
        u = uniforms.random(probs.shape[0]) * cdf[:, -1]
        return torch.from_numpy((cdf <= u[:, None]).sum(axis=-1))[:, None]

    monkeypatch.setattr(torch, "multinomial", multinomial)
    ref = hf_generate(fake, prompt, do_sample=True, max_length=6 + 30, eos_token_id=eos, pad_token_id=eos,
                      bos_token_id=eos, num_return_sequences=n, length_penalty=1.0, **TORTOISE)
    monkeypatch.undo()
    ours, _ = fake.ours(np.repeat(prompt, n, axis=0), max_new_tokens=30, eos_token_id=eos, pad_token_id=eos,
                        rng=np.random.default_rng(123), **TORTOISE)
    np.testing.assert_array_equal(ours, ref)
    assert (ours[:, 6:] == eos).any() and len(np.unique(ours[:, 6:])) > 10   # stops and genuinely samples


def test_generate_seeding_progress_and_limits():
    fake = FakeLM(8, 40, 3, 0.5)
    prompt = np.full((3, 4), 9)
    kw = dict(max_new_tokens=20, eos_token_id=3, pad_token_id=3, **TORTOISE)
    a, _ = fake.ours(prompt, rng=42, **kw)
    b, _ = fake.ours(prompt, rng=np.random.default_rng(42), **kw)
    c, _ = fake.ours(prompt, rng=43, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :4], prompt)
    ticks = []
    d, _ = fake.ours(prompt, rng=42, progress=lambda done, total: ticks.append((done, total)), **kw)
    assert ticks == [(i, 20) for i in range(1, d.shape[1] - 4 + 1)]
    # without eos the length limit alone stops it; max_length counts the prompt
    e, _ = fake.ours(prompt, rng=1, max_length=10, eos_token_id=None, pad_token_id=None)
    assert e.shape == (3, 10)
    for bad, match in [(dict(max_new_tokens=0), "no room"), (dict(max_length=12), "exactly one"),
                       (dict(pad_token_id=None), "pad_token_id"), (dict(eos_token_id=40), "vocabulary")]:
        with pytest.raises(ValueError, match=match):
            fake.ours(prompt, **dict(kw, **bad))
    with pytest.raises(ValueError, match="decode returned"):
        sampling.generate(lambda t: np.zeros((3, 39), np.float32), fake.logits(prompt), prompt, **kw)


# ----------------------------------------------------------------------------------------------------------------
# the sampler's statistics
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k, top_p", [(12, 0.9), (0, 1.0)])   # a few live tokens / the whole row
def test_multinomial_frequencies_and_support(top_k, top_p):
    scores, ids = random_case(9, 1, 64, 8, scale=2.0)
    processed = sampling.process_logits(scores, ids, **dict(TORTOISE, top_k=top_k, top_p=top_p))
    kept = np.isfinite(processed[0])
    assert 2 < kept.sum() < 12 if top_k else kept.all()          # both warpers cut something, or nothing is cut
    draws = 40_000
    tokens = sampling.multinomial(np.repeat(processed, draws, axis=0), np.random.default_rng(0))
    counts = np.bincount(tokens, minlength=64)
    assert counts[~kept].sum() == 0                              # never outside the top-k / top-p set
    p = np.exp(processed[0, kept].astype(np.float64) - processed[0, kept].max())
    expected = draws * p / p.sum()
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    df = kept.sum() - 1
    assert chi2 < df + 5 * np.sqrt(2 * df)


def test_multinomial_edges():
    # a single possible token at either end of the row, and certainty (one finite score)
    scores = np.full((4, 10), -np.inf, np.float32)
    scores[0, 0] = scores[1, 9] = 0.0
    scores[2, [4, 5]] = [80.0, -80.0]
    scores[3, 9] = 1e30
    tokens = sampling.multinomial(scores, np.random.default_rng(0))
    np.testing.assert_array_equal(tokens, [0, 9, 4, 9])
    with pytest.raises(ValueError, match="non-finite"):
        sampling.multinomial(np.full((1, 4), -np.inf, np.float32), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------------
# fix_autoregressive_output vs tortoise/api.py
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tortoise_api():
    from reference import shim
    shim.install()
    import tortoise.api
    return tortoise.api


def test_fix_autoregressive_output_matches_reference(tortoise_api, capsys):
    stop = 8193
    rng = np.random.default_rng(10)
    cases = []
    for where in ([30], [0], [49], [10, 11, 12], [20, 35], [47], [46, 48]):
        codes = rng.integers(0, 8192, 50)
        codes[where] = stop
        cases.append(codes)
    for codes in cases:
        ref = tortoise_api.fix_autoregressive_output(torch.from_numpy(codes.copy()), stop).numpy()
        ours = sampling.fix_autoregressive_output(codes, stop)
        np.testing.assert_array_equal(ours, ref)
        assert not np.array_equal(ours, codes)
    batch = np.stack(cases)
    np.testing.assert_array_equal(sampling.fix_autoregressive_output(batch, stop),
                                  np.stack([sampling.fix_autoregressive_output(c, stop) for c in cases]))
    # no stop token: unchanged, with the reference's complaint as a warning
    plain = rng.integers(0, 8192, 50)
    ref = tortoise_api.fix_autoregressive_output(torch.from_numpy(plain.copy()), stop).numpy()
    with pytest.warns(UserWarning, match="No stop tokens"):
        ours = sampling.fix_autoregressive_output(plain, stop)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, plain)
    with pytest.raises(ValueError, match="integer"):
        sampling.fix_autoregressive_output(plain.astype(np.float32), stop)
