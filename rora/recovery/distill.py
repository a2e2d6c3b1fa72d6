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

Token-level unlikelihood (Welleck et al., ICLR 2020; RecoverConfig.unlikelihood = u > 0): at every position the
student is also pushed away from the tokens already in its context that are not the next token,
u * -sum_c log(1 - p_s(c)), c over those candidates (unlikely_pairs). A pruned model copies its context too readily:
in greedy writing a small preference for a token it has just written turns into a loop. The term rides on the KL's
chunks (it needs the same student probabilities), so it costs no extra LM-head pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..measure import causal_lm_of, decoder_states, text_positions, text_sums
from ..numerics import cast_parameters
from .data import IGNORE_INDEX, Example, normalize_record, tokenize_record
from .on_policy import repeat_bans


BANNED = -1e4  # a banned token's teacher logit offset: exp() underflows to 0 in float32, log-probs stay finite


def _in_chunk(pairs, start: int, size: int):
    """The (row - start, token) columns of the [K, 2] pairs whose row lies in [start, start + size)."""
    here = pairs[(pairs[:, 0] >= start) & (pairs[:, 0] < start + size)]
    return here[:, 0] - start, here[:, 1]


class ChunkedKL(torch.autograd.Function):
    """(T^2 * KL + u * UL, UL): KL the sum over rows of KL(softmax(t/T) || softmax(s/T)), s = hidden @ weight.T,
    t = teacher's logits; UL the token-level unlikelihood sum -sum log(1 - p_s(c)) over the (row, token) pairs
    `unlikely` ([K, 2], or None: 0), weighted by u (needs T = 1). The second output is a figure, not differentiable.

    `bans` ([K, 2] rows and token ids, or None): tokens the teacher's distribution leaves out at those rows (its
    logit lowered by BANNED, so it gets probability 0 and the rest renormalises).
    Gradients flow to `hidden` and, when it requires one, to `weight` (the student's LM head; frozen under PEFT).
    The teacher's inputs never get gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, temperature: float, chunk_size: int, bans=None,
                unlikely=None, ul_weight: float = 0.0):
        if unlikely is not None and temperature != 1.0:
            raise ConfigError("the unlikelihood term needs kd_temperature 1")
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ul_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s : s + chunk_size]
            log_s = _log_probs(F.linear(h, weight), temperature)
            t_logits = F.linear(teacher_hidden[s : s + chunk_size], teacher_weight).to(hidden.device).float()
            if bans is not None:
                t_logits[_in_chunk(bans, s, chunk_size)] += BANNED
            log_t = _log_probs(t_logits, temperature)
            ul_grad = None
            if unlikely is not None:
                rows, tokens = _in_chunk(unlikely, s, chunk_size)
                p_c = log_s[rows, tokens].exp().clamp(max=1.0 - 1e-6)
                ul_total -= torch.log1p(-p_c).sum()
                ul_grad = (rows, tokens, ul_weight * p_c / (1.0 - p_c))
            # KL = sum p_t (log p_t - log p_s): the difference in place, then one dot product; passes over a chunk's
            # logits are memory-bound, so no [chunk x vocab] temporaries beyond p_t.
            p_t = log_t.exp()
            total += p_t.view(-1) @ log_t.sub_(log_s).view(-1)
            if need_h or need_w:
                # d(T^2 KL)/d(logits) = T^2 * (p_s - p_t) / T, computed in place over the student's log-probs.
                p_s = log_s.exp_()
                if ul_grad is not None:
                    # d(-log(1 - p_c))/dz_k = w_c (1[k = c] - p_k), w_c = p_c / (1 - p_c): per row, u * (w_k on the
                    # row's candidates - p_k * sum of the row's w)
                    rows, tokens, w = ul_grad
                    p_s.mul_(1.0 - torch.zeros(p_s.shape[0], device=p_s.device).index_add_(0, rows, w)[:, None])
                    p_s.index_put_((rows, tokens), w, accumulate=True)
                g = p_s.sub_(p_t)
                if temperature != 1.0:
                    g.mul_(temperature)
                if need_h:
                    grad_h[s : s + chunk_size] = g.to(weight.dtype) @ weight
                if need_w:
                    grad_w += g.T @ h.float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ul_total)
        return total * temperature**2 + ul_weight * ul_total, ul_total

    @staticmethod
    def backward(ctx, grad_out, _grad_ul):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_out * grad_h if grad_h is not None else None,
                (grad_out * grad_w).to(ctx.weight_dtype) if grad_w is not None else None,
                None, None, None, None, None, None, None)


def _log_probs(logits, temperature: float):
    logits = logits.float()
    return (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)


def chunked_kl(hidden, head: nn.Linear, teacher_hidden, teacher_head: nn.Linear, temperature: float = 1.0,
               chunk_size: int = 256, bans: torch.Tensor | None = None, unlikely: torch.Tensor | None = None,
               ul_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed T^2-scaled KL(teacher || student) + ul_weight * unlikelihood, the unlikelihood sum) over the rows of
    [N, hidden] states; see ChunkedKL."""
    if getattr(head, "bias", None) is not None or getattr(teacher_head, "bias", None) is not None:
        raise ConfigError("LM heads with a bias are not supported by the distillation loss")
    return ChunkedKL.apply(hidden, head.weight, teacher_hidden, teacher_head.weight, float(temperature), int(chunk_size),
                           bans, unlikely, float(ul_weight))


def unlikely_pairs(input_ids, keep) -> torch.Tensor:
    """[K, 2] (row, token) pairs: at each row of the kept positions (`keep`, [batch, width - 1], row-major order: the
    rows the KL walks), the distinct tokens of the context up to and including that position, except the token it
    predicts: the negative candidates of token-level unlikelihood (Welleck et al., 2020)."""
    width = input_ids.shape[1]
    same = input_ids[:, :, None] == input_ids[:, None, :]  # [batch, k, k']
    first = ~(same & torch.ones(width, width, dtype=torch.bool, device=input_ids.device).tril(-1)).any(-1)
    seen = torch.ones(width - 1, width, dtype=torch.bool, device=input_ids.device).tril()  # k <= j
    candidates = (seen[None] & first[:, None, :] & keep[:, :, None]
                  & (input_ids[:, None, :] != input_ids[:, 1:, None]))  # [batch, j, k]
    b, j, k = candidates.nonzero(as_tuple=True)
    rows = keep.reshape(-1).cumsum(0).sub(1).view_as(keep)
    return torch.stack([rows[b, j], input_ids[b, k]], dim=1)


def labelled_ce(causal_lm, hidden, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over positions whose next-token label is not IGNORE_INDEX (LM head on those only)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


class StudentLoss(nn.Module):
    """A loss over a PEFT-wrapped student: the module `accelerate.prepare` wraps (DDP, or FSDP with one unit per
    decoder layer, the layers the causal LM names in `_no_split_modules`)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self._no_split_modules = getattr(peft_model.get_base_model(), "_no_split_modules", None)


class DistillLoss(StudentLoss):
    """(summed KD term, summed SFT term) of a micro-batch for a PEFT-wrapped student and a frozen teacher.

    The teacher is kept outside the module tree on purpose: DDP must neither wrap nor broadcast its weights and FSDP
    must not shard them (every process holds its own frozen copy: the teacher runs forward only, for every
    micro-batch, and replicated it needs no communication), and `.to()` / `.train()` on this module must not
    touch it.
    """

    def __init__(self, peft_model, teacher, temperature: float, chunk_size: int, sft: bool, no_repeat: int = 0,
                 unlikelihood: float = 0.0):
        super().__init__(peft_model)
        object.__setattr__(self, "teacher", causal_lm_of(teacher))
        self.temperature, self.chunk_size, self.sft, self.no_repeat = temperature, chunk_size, sft, no_repeat
        self.unlikelihood = unlikelihood

    def forward(self, input_ids, labels, lengths, written: bool = False):
        """(KD term, SFT term, unlikelihood sum); the KD term includes `unlikelihood` times the unlikelihood sum.

        `written`: the KD term covers only the positions that predict a labelled token (an on-policy
        continuation's written tokens), there is no SFT or unlikelihood term, and with `no_repeat` = n the
        teacher's distribution at each written position leaves out the tokens that would repeat an n-gram of the
        continuation (rora.recovery.on_policy.repeat_bans)."""
        student = self.peft_model.get_base_model()
        hidden = decoder_states(student, input_ids)
        keep = labels[:, 1:] != IGNORE_INDEX if written else text_positions(lengths, input_ids.shape[1])
        with torch.inference_mode():
            t_hidden = decoder_states(self.teacher, input_ids.to(self.teacher.device))[:, :-1][keep.to(self.teacher.device)]
        bans = repeat_bans(input_ids, keep, self.no_repeat) if written and self.no_repeat else None
        unlikely = unlikely_pairs(input_ids, keep) if self.unlikelihood and not written else None
        kd, ul = chunked_kl(hidden[:, :-1][keep], student.get_output_embeddings(), t_hidden,
                            self.teacher.get_output_embeddings(), self.temperature, self.chunk_size, bans, unlikely,
                            self.unlikelihood)
        sft = labelled_ce(student, hidden, labels)[0] if self.sft and not written else kd.new_zeros(())
        return kd, sft, ul


@torch.no_grad()
def batch_sums(causal_lm, teacher, ids, labels, lengths, chunk_size: int = 256) -> torch.Tensor:
    """Held-out sums of one batch: [response NLL, response tokens, whole-text NLL, text tokens, KL (T=1)].

    KL is 0 without a teacher. The whole-text NLL and the KL cover the same positions (those that predict a real
    token), so their per-token means compare directly.
    """
    hidden = decoder_states(causal_lm, ids)
    resp, n_resp = labelled_ce(causal_lm, hidden, labels)
    return torch.cat([torch.stack([resp.float(), n_resp.float()]),
                      text_sums(causal_lm, teacher, hidden, ids, lengths, chunk_size)])


def record_examples(records: list[dict], tokenizer, cutoff_len: int) -> list[Example]:
    """Recovery records as whole training texts (prompt and response), for held-out figures; those longer than
    the cutoff are skipped."""
    found = [tokenize_record(normalize_record(r, i), tokenizer, cutoff_len, train_on_inputs=True)
             for i, r in enumerate(records)]
    return [e for e in found if e is not None]


# ---- the teacher --------------------------------------------------------------------------------------------------
def teacher_dtype(name: str) -> torch.dtype:
    """The torch dtype `RecoverConfig.teacher_dtype` names ('auto': bfloat16 on GPU, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def check_objective(config, has_teacher: bool) -> None:
    """ConfigError when the objective (or the data-free mode) needs a teacher and none is given."""
    if config.needs_teacher and not has_teacher:
        why = (f"objective {config.objective!r}" if config.objective != "sft" else
               "data-free mode (synthetic > 0)" if config.synthetic else "on-policy distillation (on_policy > 0)")
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
    """Frozen, eval mode, on `device`, its weights in `dtype` (in place; RoPE's inv_freq stays fp32, see
    numerics.cast_parameters); returns the causal LM."""
    lm = causal_lm_of(teacher)
    cast_parameters(lm.to(device=device), dtype).eval().requires_grad_(False)
    return lm
