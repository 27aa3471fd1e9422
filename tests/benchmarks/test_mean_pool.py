"""FedAvg's classifier pools as the sentence-transformer backbone was trained: the masked
mean of the last hidden states, not BERT's first-token pooler (issue 22)."""

from __future__ import annotations

import torch

from benchmarks._models import MeanPooler, mean_pool


def _tiny_bert():
    from tiny_models import tiny_config
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config("bert", vocab_size=50, num_labels=2)).eval()


def test_mean_pool_replaces_the_pooler_and_ignores_padding():
    model = _tiny_bert()
    mean_pool(model)
    assert isinstance(model.bert.pooler, MeanPooler)
    assert not any("pooler" in n for n, _ in model.named_parameters())
    ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:, :4], attention_mask=mask[:, :4]).logits
        hidden = model.bert(input_ids=ids[:, :4], attention_mask=mask[:, :4])[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.bert.pooler(hidden), hidden.mean(1))
