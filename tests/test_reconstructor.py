"""AR: truncation, identity head, right padding, last-token reading, loss."""

import pytest
import torch

from nlakit import NLAError
from nlakit.model.hooks import forward_to_layer
from nlakit.nla.reconstructor import Reconstructor, truncate_model


def test_truncated_body_has_k_plus_one_blocks_and_same_states(tiny):
    model, tok = tiny
    body = truncate_model(model, 1)
    assert body.config.num_hidden_layers == 2 and len(body.model.layers) == 2
    ids = torch.tensor([tok("def f(x): return x * 2")["input_ids"]])
    mask = torch.ones_like(ids)
    assert torch.allclose(forward_to_layer(body, ids, mask, 1),
                          forward_to_layer(model, ids, mask, 1), atol=1e-6)
    assert model.config.num_hidden_layers == 4  # the target is untouched


def test_identity_head_reads_block_k_at_last_real_token(tiny):
    model, tok = tiny
    ar = Reconstructor.from_target(model, tok, 2)
    assert torch.equal(ar.head.weight, torch.eye(64))
    texts = ["a", "a much longer explanation with many more tokens in it"]
    pred = ar.reconstruct(texts)
    for i, t in enumerate(texts):
        ids = torch.tensor([tok(ar.template.format(explanation=t))["input_ids"]])
        direct = forward_to_layer(model, ids, torch.ones_like(ids), 2)[0, -1]
        assert torch.allclose(pred[i], direct, atol=1e-5), "padding leaked into the reading"


def test_batched_equals_single(tiny):
    model, tok = tiny
    ar = Reconstructor.from_target(model, tok, 2)
    texts = ["one", "two three four", "five six"]
    batched = ar.reconstruct(texts, batch_size=3)
    single = torch.cat([ar.reconstruct([t]) for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)


def test_loss_is_normalised_mse_and_trains_the_head(tiny):
    model, tok = tiny
    ar = Reconstructor.from_target(model, tok, 2)
    ar.head.requires_grad_(True)
    target = torch.randn(2, 64)
    texts = ["x y", "z"]
    loss = ar.loss(texts, target)
    pred = ar.reconstruct(texts)
    p = pred / pred.norm(dim=-1, keepdim=True)
    g = target / target.norm(dim=-1, keepdim=True)
    assert torch.isclose(loss, ((p - g) ** 2).sum(-1).mean(), atol=1e-5)
    opt = torch.optim.SGD(ar.head.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        ar.loss(texts, target).backward()
        opt.step()
    assert ar.loss(texts, target) < loss * 0.5


def test_bad_inputs(tiny):
    model, tok = tiny
    ar = Reconstructor.from_target(model, tok, 2)
    with pytest.raises(NLAError, match="strings"):
        ar.reconstruct(["ok", None])
    assert ar.reconstruct([""]).shape == (1, 64)  # an empty explanation is scored, not refused
    with pytest.raises(NLAError, match="limit"):
        ar.reconstruct(["word " * 2000])
    with pytest.raises(NLAError, match="out of range"):
        Reconstructor.from_target(model, tok, 9)


def test_an_empty_explanation_on_the_raw_template_reads_one_special_token(tiny):
    """With `{explanation}` and a tokenizer that adds no BOS, "" has no tokens at all."""
    model, tok = tiny
    ar = Reconstructor.from_target(model, tok, 2, template="{explanation}")
    alone, mixed = ar.reconstruct([""]), ar.reconstruct(["", "some words"])
    fill = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[fill]])
    direct = forward_to_layer(model, ids, torch.ones_like(ids), 2)[0, -1]
    assert torch.allclose(alone[0], direct, atol=1e-5)
    assert torch.allclose(mixed[0], direct, atol=1e-5)
    assert torch.allclose(mixed[1], ar.reconstruct(["some words"])[0], atol=1e-5)
