"""SUN training: only the prefill tree learns; the decode tree is untouched and never in the
optimizer state; loss decreases; a killed run resumes exactly; exports round-trip."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

import sunjax
from sunjax.export import export, fingerprint, latest, load_export, load_prefill
from sunjax.sun import make_batch
from train.trainer import TrainConfig, init_state, train

CFG = sunjax.ModelConfig(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=64,
    max_position_embeddings=64,
)


def toy_pairs(n=64, seed=0):
    """Learnable toy task: the response is the prompt's first token twice, then EOS=1."""
    rng = np.random.RandomState(seed)
    pairs = []
    for _ in range(n):
        p = rng.randint(3, 40, rng.randint(2, 6)).tolist()
        pairs.append((p, [p[0], p[0], 1]))
    return pairs


def batcher(pairs):
    return lambda idx: make_batch([pairs[i] for i in idx], prompt_len=8, response_len=8)


@pytest.fixture(scope="module")
def base():
    return sunjax.init_params(CFG, jax.random.PRNGKey(0))


def test_sun_training_changes_prefill_only_and_learns(base):
    pairs = toy_pairs()
    before = jax.tree.map(np.array, base)
    tc = TrainConfig(mode="sun", steps=80, batch_size=16, learning_rate=1e-2, warmup_steps=5)
    params, history = train(
        CFG, tc, base, batcher(pairs), len(pairs), decode_params=base, progress=False
    )
    chex.assert_trees_all_equal(base, before)  # the decode tree is bitwise unchanged
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), params, before)
    assert all(jax.tree.leaves(changed))  # every prefill leaf moved
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.7 * first, (first, last)  # measured 3.66 -> 2.30


def test_optimizer_state_holds_only_the_prefill_tree(base):
    state = init_state(TrainConfig(mode="sun"), base)
    n_params = sunjax.param_count(base)
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state))
    # AdamW: first and second moments of the trainable tree, plus step counters.
    assert 2 * n_params <= n_opt <= 2 * n_params + 8
    adam = state.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(base)


def test_sun_mode_requires_a_decode_tree(base):
    with pytest.raises(ValueError, match="decode_params"):
        train(CFG, TrainConfig(mode="sun", steps=1), base, batcher(toy_pairs()), 64, progress=False)
    with pytest.raises(ValueError, match="mode='lora'"):
        TrainConfig(mode="lora")


CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from tests.train.test_trainer import CFG, batcher, toy_pairs
    import sunjax
    from train.trainer import TrainConfig, train
    pairs = toy_pairs()
    make = batcher(pairs)
    def noisy(idx):
        print("batch", flush=True)
        return make(idx)
    base = sunjax.init_params(CFG, jax.random.PRNGKey(0))
    tc = TrainConfig(mode="sun", steps=12, batch_size=8, checkpoint_every=2, seed=3)
    _, hist = train(CFG, tc, base, noisy, len(pairs), decode_params=base,
                    checkpoint_dir=sys.argv[1], progress=False)
    print("HISTORY " + json.dumps([[h["step"], h["loss"]] for h in hist]), flush=True)
    """
)


def _child(tmp_path, ckpt, kill_after=None):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=os.getcwd()))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    seen = 0
    lines = []
    for line in proc.stdout:
        lines.append(line)
        seen += line.startswith("batch")
        if kill_after is not None and seen > kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    hist = [ln for ln in lines if ln.startswith("HISTORY ")]
    return json.loads(hist[0][8:]) if hist else None


def test_killed_run_resumes_with_identical_losses(tmp_path):
    full = _child(tmp_path, tmp_path / "a")
    assert [s for s, _ in full] == list(range(1, 13))
    assert _child(tmp_path, tmp_path / "b", kill_after=7) is None  # killed mid-training
    resumed = _child(tmp_path, tmp_path / "b")
    assert resumed and resumed[0][0] > 1 and resumed[-1][0] == 12  # it did resume
    want = dict((s, loss) for s, loss in full)
    for step, loss in resumed:
        np.testing.assert_allclose(loss, want[step], rtol=1e-6)


def test_export_round_trip_fingerprint_and_interrupted_export(tmp_path, base):
    pre = {"a": jax.tree.map(lambda x: x + 1, base), "b": jax.tree.map(lambda x: x * 2, base)}
    v1 = export(tmp_path / "exp", CFG, base, pre, tokenizer_source="none")
    cfg, decode, prefill, manifest = load_export(tmp_path / "exp")
    assert cfg == CFG and manifest["tasks"] == ["a", "b"]
    chex.assert_trees_all_equal(decode, base)
    chex.assert_trees_all_equal(prefill, pre)
    assert manifest["decode_fingerprint"] == fingerprint(base)
    other = jax.tree.map(lambda x: x + 0.5, base)
    with pytest.raises(ValueError, match="refusing to pair"):
        load_prefill(tmp_path / "exp", "a", other)
    # An export killed half-way: its version directory exists but LATEST never moved to it.
    os.makedirs(os.path.join(tmp_path, "exp", "v2", "decode"))
    assert latest(tmp_path / "exp") == v1
    chex.assert_trees_all_equal(load_export(tmp_path / "exp")[2], pre)
    no_pickle = [f for d, _, fs in os.walk(v1) for f in fs if f.endswith((".pkl", ".pickle"))]
    assert not no_pickle


def test_run_shorter_than_its_warmup(base):
    pairs = toy_pairs(8)
    tc = TrainConfig(mode="sun", steps=1, batch_size=4, warmup_steps=20)
    _, history = train(
        CFG, tc, base, batcher(pairs), len(pairs), decode_params=base, progress=False
    )
    assert len(history) == 1 and np.isfinite(history[0]["loss"])


def test_eval_at_hands_over_the_params_after_those_steps(base):
    from train.trainer import train_step

    pairs = toy_pairs()
    tc = TrainConfig(mode="sun", steps=4, batch_size=8, learning_rate=1e-2, eval_at=(2, 4))
    seen = {}

    def eval_fn(params, step):
        seen[step] = jax.tree.map(np.array, params)  # copied: the state is donated next step
        return {"step_seen": float(step)}

    params, history = train(
        CFG, tc, base, batcher(pairs), len(pairs), decode_params=base, eval_fn=eval_fn,
        progress=False,
    )  # fmt: skip
    assert sorted(seen) == [2, 4]
    assert [h.get("eval_step_seen") for h in history] == [None, 2.0, None, 4.0]
    chex.assert_trees_all_equal(seen[4], jax.tree.map(np.array, params))
    # step 2's params are those of two plain train_steps under the same config
    from train.trainer import batch_indices

    state = init_state(tc, base)
    for step in range(2):
        batch = batcher(pairs)(batch_indices(len(pairs), tc.batch_size, step, tc.seed))
        state, _ = train_step(CFG, tc, state, base, batch)
    chex.assert_trees_all_close(seen[2], jax.tree.map(np.array, state.params), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[5\]"):
        TrainConfig(steps=4, eval_at=(5,))
