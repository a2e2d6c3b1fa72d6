"""Held-out figures of a model against a reference model: whole-text loss, perplexity and KL, with token counts.

Every stage reports them (the pruned, reconstructed and recovered models against the unpruned one), on held-out
text that none of them trained or calibrated on. The KL is the forward KL(reference || model) of the next-token
distributions at temperature 1, over the same positions as the loss (those that predict a real token), so the two
per-token means compare directly. Logits are formed a chunk of positions at a time: [chunk x vocab] at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError


def causal_lm_of(model):
    """The causal LM inside a PeftModel (adapters active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_states(causal_lm, input_ids):
    """The decoder's last hidden states (before the LM head)."""
    return causal_lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def text_positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, width - 1] mask of the positions that predict a real (non-padding) token of their text."""
    return torch.arange(width - 1, device=lengths.device)[None, :] < (lengths[:, None] - 1)


@torch.no_grad()
def text_sums(causal_lm, reference, hidden, ids, lengths, chunk_size: int = 256, ref_hidden=None) -> torch.Tensor:
    """[whole-text NLL, predicted tokens, KL(reference || model)] summed over one right-padded batch, given the
    model's decoder states `hidden` (and the reference's, `ref_hidden`, when already at hand: else the reference
    runs); the KL is 0 without a reference."""
    keep = text_positions(lengths, ids.shape[1])
    h, targets = hidden[:, :-1][keep], ids[:, 1:][keep]
    head = causal_lm.get_output_embeddings()
    ref_h = None
    if reference is not None:
        if ref_hidden is None:
            with torch.inference_mode():
                ref_hidden = decoder_states(reference, ids.to(reference.device))
        ref_h = ref_hidden[:, :-1][keep.to(ref_hidden.device)]
        ref_head = reference.get_output_embeddings()
    nll = kl = torch.zeros((), dtype=torch.float32, device=ids.device)
    for s in range(0, h.shape[0], chunk_size):
        log_s = head(h[s : s + chunk_size]).float().log_softmax(-1)
        nll = nll - log_s.gather(1, targets[s : s + chunk_size, None]).sum()
        if ref_h is not None:
            log_t = ref_head(ref_h[s : s + chunk_size]).float().to(ids.device).log_softmax(-1)
            kl = kl + F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return torch.stack([nll, keep.sum().float(), kl])


def heldout_metrics(model, reference, tokenizer, items, cutoff_len: int = 256, batch_size: int = 8,
                    chunk_size: int = 256) -> dict:
    """Mean whole-text NLL per token ("loss"), its perplexity, mean KL(reference || model) per token ("kl", None
    without a reference) and the number of predicted tokens ("tokens") on held-out texts.

    `items`: strings (tokenized, cut to `cutoff_len` tokens), token-id lists, or objects with `input_ids` (a
    recovery Example). `model` and `reference` may be PeftModels; both are put in eval mode for the measurement."""
    seqs = token_sequences(items, tokenizer, cutoff_len)
    model = causal_lm_of(model)
    reference = causal_lm_of(reference) if reference is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        sums = torch.zeros(3, device=device)
        for s in range(0, len(order), batch_size):
            batch = [seqs[i] for i in order[s : s + batch_size]]
            ids = right_padded(batch, pad).to(device)
            lengths = torch.tensor([len(q) for q in batch], device=device)
            with torch.no_grad():
                hidden = decoder_states(model, ids)
            sums += text_sums(model, reference, hidden, ids, lengths, chunk_size)
    finally:
        for m, was_training in modes:
            m.train(was_training)
    return metrics_of(sums, reference is not None)


def metrics_of(sums: torch.Tensor, with_kl: bool) -> dict:
    """heldout_metrics' figures from text_sums' summed [NLL, tokens, KL]."""
    n = int(sums[1])
    loss = float(sums[0]) / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "kl": float(sums[2]) / max(n, 1) if with_kl else None, "tokens": n}


def token_sequences(items, tokenizer, cutoff_len: int) -> list[list[int]]:
    """Token-id lists of at least two tokens from strings, id lists or objects with `input_ids`."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(list(tokenizer(item, add_special_tokens=True)["input_ids"])[:cutoff_len])
        elif hasattr(item, "input_ids"):
            out.append(list(item.input_ids))
        elif isinstance(item, (list, tuple)) and all(isinstance(t, int) for t in item):
            out.append(list(item))
        else:
            raise ConfigError(f"held-out items must be strings or token-id lists, got {type(item).__name__}")
    out = [q for q in out if len(q) >= 2]  # a one-token text predicts nothing
    if not out:
        raise ConfigError("no held-out text with at least two tokens within the cutoff")
    return out


def right_padded(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """[batch, longest] token ids, padded on the right (a causal model's real tokens never see the pads)."""
    ids = torch.full((len(seqs), max(len(q) for q in seqs)), pad_id, dtype=torch.long)
    for row, q in enumerate(seqs):
        ids[row, : len(q)] = torch.tensor(q)
    return ids


@dataclass
class Prose:
    """Held-out general prose and where it came from (rora.sources.text.prose_documents): every report's
    perplexity and KL against the unpruned model are measured on it, never trained or calibrated on."""

    documents: list[str]
    source: str
    cutoff_len: int = 256  # tokens per document

    @classmethod
    def load(cls, source: str = "auto", count: int = 64, data_dir=None) -> "Prose | None":
        """The prose `source` names: a .txt/.jsonl file, or auto (None when no prose is within reach: offline
        with no BoolQ passages in the data directory), or None for 'none'."""
        if source == "none":
            return None
        from .errors import DataError
        from .sources.text import prose_documents

        try:
            return cls(*prose_documents(source, data_dir, count))
        except DataError:
            if source == "auto":
                return None
            raise

    def measure(self, model, reference=None, tokenizer=None) -> dict:
        """loss, perplexity, kl (None without a reference), tokens, documents and source, for `model`."""
        found = heldout_metrics(model, reference, tokenizer, self.documents, cutoff_len=self.cutoff_len)
        return {**found, "documents": len(self.documents), "source": self.source}
