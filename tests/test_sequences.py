"""The sequence track: generator, causal LM, SequenceTask, routing statistics, the experiment."""
from __future__ import annotations

import hashlib
import math
import random

import pytest
import torch

from moe_lite import sequences as S
from moe_lite.experiments.core import RunContext
from moe_lite.experiments.sequence import mutual_information, run_sequence, seed_statistics
from moe_lite.experiments.dynamic import spearman
from moe_lite.models.lm import CausalLM, LMConfig, SequenceTask, accuracy_by_task_level, answer_logits
from moe_lite.models.vit import experts_per_token


def tiny(router="topk", **kw):
    return LMConfig(vocab_size=len(S.VOCAB), max_len=S.SEQ_LEN, dim=16, depth=2, heads=2, mlp_hidden=32,
                    moe_layers="all", num_experts=4, expert_hidden=8, router=router, **kw)


# ---- the generator -----------------------------------------------------------------------------------
def test_generator_is_deterministic_and_splits_differ():
    a, b = S.load_sequences("train", 50, seed=3), S.load_sequences("train", 50, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert torch.equal(S.load_sequences("train", 20, seed=3).tokens, a.tokens[:20])  # a prefix
    assert not torch.equal(S.load_sequences("test", 50, seed=3).tokens, a.tokens)
    assert not torch.equal(S.load_sequences("train", 50, seed=4).tokens, a.tokens)


def test_the_embedded_split_is_the_same_everywhere():
    """A fingerprint of the first test rows: it changes only if the generator does (which would
    silently change every published number)."""
    ds = S.load_sequences("test", 64, seed=0)
    text = repr([t.tolist() for t in ds.tensors()])  # not raw bytes: the same on any byte order
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert ds.text(1) == "4 4 9 + 7 8 6 = [1] [3] [6] [1]"
    assert digest == FINGERPRINT


FINGERPRINT = "23ad0783490e9f54"


def test_addition_labels_by_hand():
    # 321 + 9 (least significant digit first: 1 2 3 and 9 0 0) = 330: one carry (1 + 9)
    assert S.count_carries([1, 2, 3], [9, 0, 0]) == 1
    assert S.count_carries([9, 9, 9], [1, 0, 0]) == 3  # 999 + 1 = 1000
    assert S.count_carries([5, 5, 0], [5, 4, 0]) == 2  # 55 + 45 = 100
    assert S.count_carries([1, 2, 3], [4, 5, 6]) == 0
    rng = random.Random(0)
    for level in range(S.LEVELS):
        ex = S.make_example(rng, "add", level)
        a = [int(d) for d in ex.prompt[:3]]
        b = [int(d) for d in ex.prompt[4:]]
        assert ex.prompt[3] == "+" and S.count_carries(a, b) == level
        total = sum(d * 10 ** i for i, d in enumerate(a)) + sum(d * 10 ** i for i, d in enumerate(b))
        assert "".join(reversed(ex.answer)) == f"{total:04d}"


def test_every_task_answer_by_hand():
    rng = random.Random(1)
    for level in range(S.LEVELS):
        for task in ("copy", "reverse", "sort"):
            ex = S.make_example(rng, task, level)
            digits = list(ex.prompt[1:])
            assert ex.prompt[0] == {"copy": "C", "reverse": "R", "sort": "S"}[task]
            assert len(digits) == 2 + 3 * level
            assert list(ex.answer) == {"copy": digits, "reverse": digits[::-1], "sort": sorted(digits)}[task]
        ex = S.make_example(rng, "count", level)
        assert len(ex.prompt) == 3 + 2 * level and ex.answer == (str(ex.prompt.count("b")),)
        ex = S.make_example(rng, "brackets", level)
        stack = []
        for b in ex.prompt:  # the prompt is a valid prefix
            if b in "([":
                stack.append(b)
            else:
                assert stack and {"(": ")", "[": "]"}[stack.pop()] == b
        assert len(stack) == level + 1  # the level is the open depth minus 1
        assert list(ex.answer) == [{"(": ")", "[": "]"}[b] for b in reversed(stack)]


def test_per_token_labels_and_mask_of_one_row():
    ex = S.Example(prompt=("R", "3", "1", "4"), answer=("4", "1", "3"), task="reverse", level=1)
    ds = S._to_sequences([ex], "train", 0)
    assert ds.text(0) == "R 3 1 4 = [4] [1] [3]"
    assert ds.mask[0].tolist() == [False] * 5 + [True] * 3 + [False] * (S.SEQ_LEN - 8)
    assert ds.task[0].tolist() == [1] * 8 + [-1] * (S.SEQ_LEN - 8)
    assert ds.difficulty[0].tolist() == [1] * 8 + [-1] * (S.SEQ_LEN - 8)
    # position 4 ("=") predicts the first answer token; position 7 (the last one) predicts padding
    assert S.predicting_positions(ds.mask)[0].nonzero().flatten().tolist() == [4, 5, 6]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="split"):
        S.load_sequences("valid")
    with pytest.raises(ValueError, match="size"):
        S.load_sequences("train", size=0)
    with pytest.raises(ValueError, match="seed"):
        S.load_sequences("train", 4, seed=-1)
    with pytest.raises(ValueError, match="tasks"):
        S.load_sequences("train", 4, tasks=["copy", "poetry"])
    with pytest.raises(ValueError, match="level"):
        S.make_example(random.Random(0), "copy", 4)
    with pytest.raises(ValueError, match="batch_size"):
        S.make_sequence_loader(S.load_sequences("train", 4), batch_size=0)


def test_loader_batches_and_reproducible_order():
    ds = S.load_sequences("train", 10)
    first = [b[0] for b in S.make_sequence_loader(ds, 4, seed=7)]
    again = [b[0] for b in S.make_sequence_loader(ds, 4, seed=7)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    batch = next(iter(S.make_sequence_loader(ds, 4, shuffle=False)))
    assert [tuple(t.shape) for t in batch] == [(4, S.SEQ_LEN)] * 4 and torch.equal(batch[0], ds.tokens[:4])


# ---- the model and the task ----------------------------------------------------------------------------
@pytest.mark.parametrize("router,kwargs", [("topk", {"k": 2}), ("topp", {"p": 0.5}), ("race", {"k": 2})])
def test_changing_a_future_token_leaves_earlier_outputs_alone(router, kwargs):
    torch.manual_seed(0)
    model = CausalLM(tiny(router, router_kwargs=kwargs))
    tokens = S.load_sequences("train", 6).tokens
    if router == "race":  # race is causal in eval only, with the threshold from training
        model.train()
        model(tokens)
    model.eval()
    before = model(tokens)
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 5) % len(S.VOCAB)
    after = model(changed)
    assert torch.allclose(before[:, :9], after[:, :9], atol=1e-6)
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the changed position itself does move


def test_loss_is_on_answer_tokens_only():
    torch.manual_seed(0)
    model = CausalLM(tiny())
    ds = S.load_sequences("train", 8)
    task = SequenceTask()
    loss, _ = task.loss(model, ds.tensors())
    logits = model(ds.tokens)  # the hand computation: cross-entropy over the answer tokens only
    scored = ds.mask[:, 1:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][scored], ds.tokens[:, 1:][scored])
    assert torch.allclose(loss, manual)
    assert int(scored.sum()) == int(ds.mask.sum())  # every answer token is scored (none at position 0)
    # a loss with every token scored differs, so the mask matters
    everything = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ds.tokens[:, 1:].reshape(-1))
    assert not torch.allclose(loss, everything)


def test_answer_logits_pick_the_shifted_targets():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    tokens = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 1]])
    mask = torch.tensor([[False, False, True, True], [False, True, False, False]])
    out, targets = answer_logits(logits, tokens, mask)
    assert targets.tolist() == [2, 0, 2]
    assert torch.equal(out, torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]))


def test_evaluate_reports_per_task_accuracy():
    torch.manual_seed(0)
    model = CausalLM(tiny()).eval()
    ds = S.load_sequences("test", 40)
    metrics = SequenceTask().evaluate(model, S.make_sequence_loader(ds, 16, shuffle=False))
    assert {"loss", "accuracy", "sequence_accuracy"} <= set(metrics)
    assert all(f"accuracy/{t}" in metrics for t in S.TASKS)
    assert 0 <= metrics["accuracy"] <= 1 and math.isfinite(metrics["loss"])


def test_accuracy_by_task_level_by_hand():
    correct = torch.tensor([True, False, True, True, False])
    task = torch.tensor([0, 0, 1, 1, 1])
    level = torch.tensor([0, 0, 1, 1, 0])
    out = accuracy_by_task_level(correct, task, level, num_tasks=2, num_levels=2)
    assert out["count"].tolist() == [[2, 0], [1, 2]]
    acc = out["accuracy"]
    assert acc[0, 0] == 0.5 and math.isnan(acc[0, 1]) and acc[1, 0] == 0.0 and acc[1, 1] == 1.0
    with pytest.raises(ValueError, match="task ids"):
        accuracy_by_task_level(correct, task + 5, level, num_tasks=2, num_levels=2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="router"):
        LMConfig(router="nope")
    with pytest.raises(ValueError, match="heads"):
        LMConfig(dim=30, heads=4)
    # the MoE fields go through the check ViTConfig uses (moe_lite.models.vit.check_moe_fields)
    with pytest.raises(ValueError, match="LMConfig.moe_losses: weight of loss 'load_balance'"):
        LMConfig(moe_losses={"load_balance": -1.0})
    with pytest.raises(ValueError, match="LMConfig.num_shared"):
        LMConfig(num_shared=True)
    with pytest.raises(ValueError, match="max_len"):
        CausalLM(LMConfig(max_len=4))(torch.zeros(1, 5, dtype=torch.long))


# ---- statistics ----------------------------------------------------------------------------------------
def test_mutual_information_by_hand():
    # experts identify the label exactly: I = H(label) = 1 bit
    assert mutual_information(torch.tensor([[5.0, 0.0], [0.0, 5.0]])) == {"mi": 1.0, "normalized": 1.0}
    # independent: 0
    assert mutual_information(torch.tensor([[2.0, 2.0], [1.0, 1.0]]))["mi"] == pytest.approx(0.0, abs=1e-12)
    # p = [[1/2, 1/4], [0, 1/4]]: I = 1/2 log2(1/2 / (3/4 * 1/2)) + 1/4 log2(1/4 / (3/4 * 1/2))
    #                                 + 1/4 log2(1/4 / (1/4 * 1/2)) = 0.311278 bits; H(label) = 0.811278
    out = mutual_information(torch.tensor([[2.0, 1.0], [0.0, 1.0]]))
    assert out["mi"] == pytest.approx(0.311278, abs=1e-6)
    assert out["normalized"] == pytest.approx(0.311278 / 0.811278, abs=1e-6)
    with pytest.raises(ValueError, match="counts"):
        mutual_information(torch.tensor([1.0, 2.0]))


def test_spearman_by_hand():
    # ranks of a: 1, 2, 3, 4; of b: 2, 1, 4, 3 -> rho = 1 - 6 * (1+1+1+1) / (4 * 15) = 0.6
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([20.0, 10.0, 40.0, 30.0])) == pytest.approx(0.6)
    # ties get mean ranks: a = [1, 1, 2] -> ranks 1.5, 1.5, 3; b = [1, 2, 3]: rho = 0.866025
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(math.sqrt(3) / 2)


def test_seed_statistics_on_a_hand_made_profile():
    profile = {
        "experts": torch.tensor([1.0, 2.0, 3.0, 4.0]), "level": torch.tensor([0, 1, 2, 3]),
        "task": torch.tensor([0, 0, 3, 3]), "correct": torch.tensor([True, True, False, True]),
        "loss": torch.tensor([0.1, 0.2, 2.0, 0.3]),
        "layers": {"blocks.0.mlp": torch.tensor([1.0, 1.0, 1.0, 1.0]),
                   "blocks.1.mlp": torch.tensor([1.0, 3.0, 5.0, 7.0])},
        "task_expert": {"blocks.0.mlp": torch.tensor([[5.0, 0.0], [0.0, 5.0]])},
        "token_expert": {"blocks.0.mlp": torch.tensor([[2.0, 2.0], [1.0, 1.0]])},
    }
    out = seed_statistics(profile)
    assert out["spearman_level"] == pytest.approx(1.0)
    assert out["spearman_loss"] == pytest.approx(0.8)  # loss ranks 1, 2, 4, 3
    assert out["experts_by_level"] == [1.0, 2.0, 3.0, 4.0]
    by_task = out["experts_by_task"]
    assert by_task[0] == 1.5 and by_task[3] == 3.5 and math.isnan(by_task[1])
    assert out["accuracy_by_task"][3] == 0.5 and out["accuracy"] == 0.75
    assert out["experts_by_layer"] == {"blocks.0.mlp": 1.0, "blocks.1.mlp": 4.0}
    assert out["mi_task"]["blocks.0.mlp"]["mi"] == 1.0
    constant = dict(profile, experts=torch.full((4,), 2.0))
    assert math.isnan(seed_statistics(constant)["spearman_level"])  # top-k: nothing to correlate


# ---- the experiment ------------------------------------------------------------------------------------
def test_smoke_experiment_reports_every_question():
    ctx = RunContext.create("smoke", seeds=[0, 1], device="cpu", progress=False, cache=None)
    result = run_sequence(ctx=ctx, variants=("top-2", "top-p"))
    assert set(result.models) == {"top-2", "top-p"}
    for table in ("accuracy_by_task", "experts_by_level", "experts_by_layer", "mi_task"):
        assert [row["model"] for row in result.table(table)] == ["top-2", "top-p"]
        assert all(row["seeds"] == 2 for row in result.table(table))
    # the JSON keeps tables by their titles
    assert result.tables["experts per token by difficulty level"] is result.table("experts_by_level")
    top2 = result.metrics["top-2"]
    assert top2["experts_per_token"]["mean"] == 2.0 and top2["experts_per_token"]["n"] == 2
    assert result.table("experts_by_level")[0]["spearman(experts, level)"] == "n/a"
    assert len(result.metrics["threshold_sweep"]) == 4
    # the trained top-p threshold is back after the sweep
    assert result.models["top-p"].config.router_kwargs["p"] == pytest.approx(
        float(next(m for m in result.models["top-p"].modules() if hasattr(m, "threshold")).threshold))
    result.to_dict()  # JSON-ready
    with pytest.raises(ValueError, match="no variant"):
        run_sequence(ctx=ctx, variants=("top-3",))


def test_routing_is_read_at_the_predicting_positions():
    """experts_per_token [B, T] from the model lines up with the tokens (a sanity check that the
    profile reads routing at the right positions)."""
    torch.manual_seed(0)
    model = CausalLM(tiny("topp", router_kwargs={"p": 0.5})).eval()
    ds = S.load_sequences("test", 5)
    model(ds.tokens)
    for ept in experts_per_token(model).values():
        assert ept.shape == ds.tokens.shape


def test_race_in_training_lets_later_tokens_move_earlier_ones():
    """What the lm docstring warns about: in training the batch-wide race lets a later token change
    which experts earlier tokens get; in eval (EMA threshold) it does not (test above)."""
    torch.manual_seed(0)
    model = CausalLM(tiny("race", router_kwargs={"k": 2})).train()
    tokens = S.load_sequences("train", 6).tokens
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 5) % len(S.VOCAB)
    with torch.no_grad():
        assert not torch.allclose(model(tokens)[:, :9], model(changed)[:, :9], atol=1e-6)
