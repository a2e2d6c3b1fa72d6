"""Knowledge distillation from the unpruned model: the chunked KL loss, the teacher's checks, held-out figures.

The KD objective is the forward KL(teacher || student) of the next-token distributions at every position of a text
that predicts one of its tokens (prompt and response alike; padding excluded), both softened by a temperature T and
scaled by T^2 so that gradient sizes do not depend on T (Hinton et al., 2015).

Memory: a micro-batch of 16 x 256 tokens on a 49k vocabulary has 800 MB of fp32 logits per model, and autograd
would keep several such tensors (logits, log-softmax, softmax) alive until the backward. Here both decoders run to
their last hidden states only; `ChunkedKL` then walks the positions in chunks, applies both LM heads, and computes
the chunk's KL and its gradient with respect to the student's hidden states right away (dKL/dz = T (p_s - p_t)),
keeping only that [tokens x hidden] gradient for the backward. One chunk of logits is live at any time, there is a
single backward pass (so DDP's gradient hooks fire once, as for any loss), and no logits are recomputed.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .data import IGNORE_INDEX, Example, collate, tokenize_record


class ChunkedKL(torch.autograd.Function):
    """T^2 * sum over rows of KL(softmax(t/T) || softmax(s/T)), s = hidden @ weight.T, t = teacher's logits.

    Gradients flow to `hidden` and, when it requires one, to `weight` (the student's LM head; frozen under PEFT).
    The teacher's inputs never get gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, temperature: float, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s : s + chunk_size]
            log_s = _log_probs(F.linear(h, weight), temperature)
            log_t = _log_probs(F.linear(teacher_hidden[s : s + chunk_size], teacher_weight).to(hidden.device),
                               temperature)
            # KL = sum p_t (log p_t - log p_s): the difference in place, then one dot product; passes over a chunk's
            # logits are memory-bound, so no [chunk x vocab] temporaries beyond p_t.
            p_t = log_t.exp()
            total += p_t.view(-1) @ log_t.sub_(log_s).view(-1)
            if need_h or need_w:
                # d(T^2 KL)/d(logits) = T^2 * (p_s - p_t) / T, computed in place over the student's log-probs.
                g = log_s.exp_().sub_(p_t)
                if temperature != 1.0:
                    g.mul_(temperature)
                if need_h:
                    grad_h[s : s + chunk_size] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w += g.T @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_out * grad_h if grad_h is not None else None,
                (grad_out * grad_w).to(ctx.weight_dtype) if grad_w is not None else None,
                None, None, None, None)


def _log_probs(logits, temperature: float):
    logits = logits.float()
    return (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)


def chunked_kl(hidden, head: nn.Linear, teacher_hidden, teacher_head: nn.Linear, temperature: float = 1.0,
               chunk_size: int = 256) -> torch.Tensor:
    """Summed T^2-scaled KL(teacher || student) over the rows of [N, hidden] states; see ChunkedKL."""
    if getattr(head, "bias", None) is not None or getattr(teacher_head, "bias", None) is not None:
        raise ConfigError("LM heads with a bias are not supported by the distillation loss")
    return ChunkedKL.apply(hidden, head.weight, teacher_hidden, teacher_head.weight, float(temperature), int(chunk_size))


def causal_lm_of(model):
    """The causal LM inside a PeftModel (adapters active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_positions(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, width - 1] mask of the positions that predict a real (non-padding) token of their text."""
    return torch.arange(width - 1, device=lengths.device)[None, :] < (lengths[:, None] - 1)


def labelled_ce(causal_lm, hidden, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over positions whose next-token label is not IGNORE_INDEX (LM head on those only)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


def _hidden(causal_lm, input_ids):
    return causal_lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


class DistillLoss(nn.Module):
    """(summed KD term, summed SFT term) of a micro-batch for a PEFT-wrapped student and a frozen teacher.

    The teacher is kept outside the module tree on purpose: DDP must neither wrap nor broadcast its weights (every
    process holds its own copy), and `.to()` / `.train()` on this module must not touch it.
    """

    def __init__(self, peft_model, teacher, temperature: float, chunk_size: int, sft: bool):
        super().__init__()
        self.peft_model = peft_model
        object.__setattr__(self, "teacher", causal_lm_of(teacher))
        self.temperature, self.chunk_size, self.sft = temperature, chunk_size, sft

    def forward(self, input_ids, labels, lengths):
        student = self.peft_model.get_base_model()
        hidden = _hidden(student, input_ids)
        keep = text_positions(lengths, input_ids.shape[1])
        with torch.inference_mode():
            t_hidden = _hidden(self.teacher, input_ids.to(self.teacher.device))[:, :-1][keep.to(self.teacher.device)]
        kd = chunked_kl(hidden[:, :-1][keep], student.get_output_embeddings(), t_hidden,
                        self.teacher.get_output_embeddings(), self.temperature, self.chunk_size)
        sft = labelled_ce(student, hidden, labels)[0] if self.sft else kd.new_zeros(())
        return kd, sft


@torch.no_grad()
def batch_sums(causal_lm, teacher, ids, labels, lengths, chunk_size: int = 256) -> torch.Tensor:
    """Held-out sums of one batch: [response NLL, response tokens, whole-text NLL, text tokens, KL (T=1)].

    KL is 0 without a teacher. The whole-text NLL and the KL cover the same positions (those that predict a real
    token), so their per-token means compare directly.
    """
    hidden = _hidden(causal_lm, ids)
    resp, n_resp = labelled_ce(causal_lm, hidden, labels)
    keep = text_positions(lengths, ids.shape[1])
    h, targets = hidden[:, :-1][keep], ids[:, 1:][keep]
    head = causal_lm.get_output_embeddings()
    t_h = None
    if teacher is not None:
        with torch.inference_mode():
            t_h = _hidden(teacher, ids.to(teacher.device))[:, :-1][keep.to(teacher.device)]
        t_head = teacher.get_output_embeddings()
    nll = kl = torch.zeros((), dtype=torch.float32, device=ids.device)
    for s in range(0, h.shape[0], chunk_size):
        log_s = head(h[s : s + chunk_size]).float().log_softmax(-1)
        nll = nll - log_s.gather(1, targets[s : s + chunk_size, None]).sum()
        if t_h is not None:
            log_t = t_head(t_h[s : s + chunk_size]).float().to(ids.device).log_softmax(-1)
            kl = kl + F.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return torch.stack([resp.float(), n_resp.float(), nll, keep.sum().float(), kl])


def heldout_metrics(model, teacher, tokenizer, texts_or_examples, cutoff_len: int = 256, batch_size: int = 8,
                    chunk_size: int = 256) -> dict:
    """Whole-text mean NLL per token ("loss"), mean KL(teacher || model) per token ("kl", None without a teacher)
    and the number of predicted tokens ("tokens") on held-out texts.

    `texts_or_examples`: strings (truncated to `cutoff_len` tokens), recovery records (the training prompt with
    its response; those longer than the cutoff are skipped), or tokenized `Example`s. `model` may be a PeftModel.
    KL is at temperature 1: the distributions themselves, whatever temperature a run trained with.
    """
    examples = _as_examples(texts_or_examples, tokenizer, cutoff_len)
    student = causal_lm_of(model)
    teacher = causal_lm_of(teacher) if teacher is not None else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(student.parameters()).device
    modes = [(m, m.training) for m in (student, teacher) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        sums = torch.zeros(5, device=device)
        for s in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[s : s + batch_size]]
            ids, labels = (t.to(device) for t in collate(batch, pad))
            lengths = torch.tensor([len(e) for e in batch], device=device)
            sums += batch_sums(student, teacher, ids, labels, lengths, chunk_size)
    finally:
        for m, was_training in modes:
            m.train(was_training)
    n = int(sums[3])
    return {"loss": float(sums[2]) / max(n, 1), "kl": float(sums[4]) / max(n, 1) if teacher is not None else None,
            "tokens": n}


def _as_examples(items, tokenizer, cutoff_len: int) -> list[Example]:
    out = []
    for item in items:
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=True)["input_ids"][:cutoff_len]
            out.append(Example(ids, list(ids)))
        elif isinstance(item, dict):
            from .data import normalize_record

            e = tokenize_record(normalize_record(item, len(out)), tokenizer, cutoff_len, train_on_inputs=True)
            if e is not None:
                out.append(e)
        else:
            raise ConfigError(f"held-out items must be strings, records or Examples, got {type(item).__name__}")
    out = [e for e in out if len(e) >= 2]  # a one-token text predicts nothing
    if not out:
        raise ConfigError("no held-out text with at least two tokens within the cutoff")
    return out


# ---- the teacher --------------------------------------------------------------------------------------------------
def teacher_dtype(name: str) -> torch.dtype:
    """The torch dtype `RecoverConfig.teacher_dtype` names ('auto': bfloat16 on GPU, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def check_objective(config, has_teacher: bool) -> None:
    """ConfigError when the objective (or the data-free mode) needs a teacher and none is given."""
    if config.needs_teacher and not has_teacher:
        why = f"objective {config.objective!r}" if config.objective != "sft" else "data-free mode (synthetic > 0)"
        raise ConfigError(f"the {why} needs a teacher: pass --teacher SPEC (in Python, recover(..., teacher=model))")


def check_teacher(teacher, student, tokenizer=None, teacher_tokenizer=None) -> None:
    """ConfigError unless `teacher` is a causal LM with the student's vocabulary (and tokenizer, when both given)."""
    if teacher is student:
        raise ConfigError("the teacher must be a separate model, e.g. copy.deepcopy(model): the student is wrapped "
                          "with adapters in place")
    lm = causal_lm_of(teacher)
    head = lm.get_output_embeddings() if callable(getattr(lm, "get_output_embeddings", None)) else None
    if head is None or not callable(getattr(lm, "get_decoder", None)):
        raise ConfigError(f"the teacher ({type(lm).__name__}) is not a causal LM: it has no LM head over a decoder")
    if tokenizer is not None and teacher_tokenizer is not None:
        problem = tokenizer_difference(tokenizer, teacher_tokenizer)
        if problem:
            raise ConfigError(f"the teacher's tokenizer differs from the student's: {problem}; "
                              "distillation needs the same tokenizer")
    s_rows, t_rows = causal_lm_of(student).get_output_embeddings().weight.shape[0], head.weight.shape[0]
    if s_rows != t_rows:
        raise ConfigError(f"the teacher's vocabulary differs from the student's: its LM head has {t_rows} tokens, "
                          f"the student's {s_rows}; distillation needs the same tokenizer and vocabulary")


def check_positions(model, tokens: int, role: str) -> None:
    """ConfigError when `model` (the student or the teacher) handles fewer positions than `tokens` (the cutoff):
    found before the first step, not as an IndexError in it (or as silently extrapolated positions)."""
    config = getattr(causal_lm_of(model), "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and limit < tokens:
        raise ConfigError(f"the {role} handles {limit} positions (max_position_embeddings) but --cutoff-len is "
                          f"{tokens}; lower --cutoff-len to {limit} or less")


def tokenizer_difference(student_tok, teacher_tok) -> str | None:
    """What differs between two tokenizers (vocabulary size, a token's id, a special token), or None."""
    if len(student_tok) != len(teacher_tok):
        return f"{len(teacher_tok)} tokens vs the student's {len(student_tok)}"
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        token = next(t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t))
        return f"token {token!r} has id {b.get(token)} in the teacher's, {a.get(token)} in the student's"
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            return f"{name} {getattr(teacher_tok, name)} vs the student's {getattr(student_tok, name)}"
    return None


def prepare_teacher(teacher, device, dtype: torch.dtype):
    """Frozen, eval mode, on `device` in `dtype` (in place); returns the causal LM."""
    lm = causal_lm_of(teacher)
    lm.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return lm


def model_signature(model) -> str:
    """A cheap fingerprint of a model's weights (shapes, dtypes and a slice of every tensor), for resume checks and
    the synthetic-text cache key: hashing every byte of a 1B model would take seconds on each run."""
    digest = hashlib.sha256()
    for name, p in causal_lm_of(model).state_dict().items():
        flat = p.detach().reshape(-1)
        sample = torch.cat([flat[:256], flat[-256:]]).float().cpu()
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(flat.float().sum()):.6e}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]

